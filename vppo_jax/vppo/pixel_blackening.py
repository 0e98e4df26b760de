"""Random Patch Blackening with the reference's geometry, on the host (algo.perturbation="blacken_pixels").

The reference blackens 14 x 14-pixel tiles of the image as its data pipeline hands it over
(after the recipe's pixel budget, `image_processor.fit_pixel_budget`), each with probability 0.5,
and only then runs the image processor, whose bicubic resize to multiples of 28 moves the
tile edges off the ViT patch grid: most ViT patches come out partly black, few fully.
`perturbation.blacken_patches` blackens whole ViT patches inside the compiled step instead
(exactly half of them fully black, none partly); benchmarks/perturbation_geometry.py
measures how the two differ.

Here every rollout row gets its own mask (the G rows of a group differ), drawn from a
NumPy generator seeded by the step, and the blackened images go through the same image
processor as the originals. The step then reads the result from `TrainBatch.perturbed_patches`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vppo_jax.models.qwen2_5_vl.image_processor import ImageProcessor

TILE = 14


def blacken_tiles(image: np.ndarray, rng: np.random.Generator, prob: float = 0.5, tile: int = TILE) -> np.ndarray:
    """A copy of the (H, W, 3) uint8 image with each tile x tile block (the last ones cut by the
    border) set to black with probability `prob`."""
    rows, cols = -(-image.shape[0] // tile), -(-image.shape[1] // tile)
    black = rng.random((rows, cols)) < prob
    pixels = np.repeat(np.repeat(black, tile, axis=0), tile, axis=1)[: image.shape[0], : image.shape[1]]
    return np.where(pixels[..., None], np.uint8(0), image)


def perturbed_pixel_values(
    prompts: list, group_size: int, processor: ImageProcessor, seed: np.ndarray, prob: float = 0.5
) -> np.ndarray:
    """pixel_values of every rollout row's blackened images, in the order of the rows' own
    pixel_values (prompt by prompt, each repeated for its G rows, images in prompt order)."""
    rng = np.random.default_rng(seed)
    rows = []
    for prompt in prompts:
        for _ in range(group_size):
            for image in prompt.images:
                rows.append(processor(Image.fromarray(blacken_tiles(image, rng, prob)))[0])
    return np.concatenate(rows)
