"""Host-side assembly of a `TrainBatch` from full sequences (prompt + response)."""
from __future__ import annotations

import jax
import numpy as np

from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from vppo_jax.models.qwen2_5_vl.inputs import count_windows, largest_frame_windows, prepare_inputs, vision_inputs
from vppo_jax.vppo.step import TrainBatch


def _images_per_row(config: Qwen2_5_VLConfig, input_ids: np.ndarray, grids: np.ndarray) -> list[int]:
    """How many of the (row-major ordered) images each row holds, from its image tokens."""
    tokens_per_image = (np.prod(grids, axis=1) // config.vision.merge_unit).tolist()
    counts, image = [], 0
    for row in input_ids:
        need, count = int((row == config.image_token_id).sum()), 0
        while need > 0:
            need -= tokens_per_image[image]
            image, count = image + 1, count + 1
        if need:
            raise ValueError("image tokens of a row do not add up to whole images of image_grid_thw")
        counts.append(count)
    return counts


def build_train_batch(
    config: Qwen2_5_VLConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    response_tokens: np.ndarray,
    advantages: np.ndarray,
    pixel_values: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    micro_batches: int = 1,
    perturbed_pixel_values: np.ndarray | None = None,
) -> TrainBatch:
    """Splits B rows into `micro_batches` consecutive micro-batches with equal shapes.

    `perturbed_pixel_values`, rows like `pixel_values`: the images I' blackened on the host
    (vppo_jax/vppo/pixel_blackening.py), laid out like the originals.

    `response_tokens` (B, T) marks the response tokens of each row. Position t predicts
    token t + 1, so targets and the response mask are shifted one step left.
    """
    batch = input_ids.shape[0]
    if batch % micro_batches:
        raise ValueError(f"{batch} rows do not split into {micro_batches} equal micro-batches.")
    rows = batch // micro_batches
    targets = np.concatenate([input_ids[:, 1:], np.zeros_like(input_ids[:, :1])], axis=1)
    response_mask = np.concatenate([response_tokens[:, 1:], np.zeros_like(response_tokens[:, :1])], axis=1)

    # Images of each micro-batch: a contiguous run of images and pixel rows.
    parts = []
    if pixel_values is not None:
        grids = np.asarray(image_grid_thw).reshape(-1, 3)
        per_row = np.asarray(_images_per_row(config, input_ids, grids))
        image_bounds = np.concatenate([[0], np.cumsum(per_row.reshape(micro_batches, rows).sum(1))])
        pixel_bounds = np.concatenate([[0], np.cumsum(np.prod(grids, axis=1))])
        for m in range(micro_batches):
            first, last = image_bounds[m], image_bounds[m + 1]
            pixels = slice(pixel_bounds[first], pixel_bounds[last])
            perturbed = None if perturbed_pixel_values is None else perturbed_pixel_values[pixels]
            parts.append((pixel_values[pixels], grids[first:last], perturbed))
    else:
        parts = [(None, None, None)] * micro_batches

    # One window layout for all micro-batches, so their vision inputs stack.
    grids = [grid for _, grid, _ in parts if grid is not None]
    windows = max((count_windows(config.vision, grid) for grid in grids), default=1)
    frame_windows = max((largest_frame_windows(config.vision, grid) for grid in grids), default=1)
    inputs = [
        prepare_inputs(config, input_ids[m * rows:(m + 1) * rows], attention_mask[m * rows:(m + 1) * rows],
                       pixels, grid, min_windows=windows, min_frame_windows=frame_windows)
        for m, (pixels, grid, _) in enumerate(parts)
    ]
    perturbed_patches = None
    if perturbed_pixel_values is not None:  # the same slot layout, other pixels
        perturbed_patches = np.stack([vision_inputs(config.vision, perturbed, grid, windows, frame_windows)[0].patches
                                      for _, grid, perturbed in parts])
    split = lambda a: a.reshape(micro_batches, rows, *a.shape[1:])
    return TrainBatch(
        inputs=jax.tree.map(lambda *leaves: np.stack(leaves), *inputs),
        targets=split(targets.astype(np.int32)),
        response_mask=split(response_mask.astype(bool)),
        advantages=split(np.asarray(advantages, np.float32)),
        perturbed_patches=perturbed_patches,
    )
