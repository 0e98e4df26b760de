"""Host-side preparation of model inputs: everything that depends on image sizes.

The HF processor returns pixel patches of all images concatenated, their grids
(t, h, w), token ids and mm_token_type_ids. Image sizes vary, but a compiled function
needs static shapes, so here (in NumPy, on the host) we compute:

* the vision *slot layout*: patches rearranged into attention windows of
  `window_units**2` merge units (each unit = 2 x 2 patches), every window padded to full
  size and the number of windows padded to a bucket. Window attention becomes attention
  inside fixed-size blocks; full attention uses a per-frame segment id and, since a frame's
  windows are consecutive, looks only `frame_windows` windows ahead of the frame's first
  (the largest frame's window count, bucketed: a static field). HF instead permutes
  the real patches into window order with variable-length windows; the two give the same
  result because padding slots are masked out.
* for every image token in the text, the slot of the merge unit whose feature it receives
  (HF scatters the merged features in row-major (batch, position) order);
* the M-RoPE position ids, exactly as transformers' `get_rope_index` numbers them.
"""

from __future__ import annotations

import itertools

import flax.struct
import jax
import numpy as np

from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, VisionConfig

TEXT, IMAGE = 0, 1


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): one compile per bucket, not per size."""
    return 1 << (max(n, minimum) - 1).bit_length()


def length_bucket(n: int, minimum: int = 1) -> int:
    """Smallest 2^k or 1.5 * 2^k >= max(n, minimum): less than a third is padding, with twice
    as many buckets as `bucket`."""
    size = bucket(n, minimum)
    return size * 3 // 4 if size % 4 == 0 and size * 3 // 4 >= max(n, minimum) else size


def left_pad_to_bucket(batch: dict, min_length: int = 1, pad_id: int = 0) -> dict:
    """The batch with its (B, T) token arrays left-padded to length_bucket(T, min_length) columns.

    `batch` holds the arrays of an HF processor (already left-padded to its longest row).
    Left padding puts every prompt's last token in the last column, where decoding goes on;
    bucketing keeps the number of compiled prompt shapes small.
    """
    input_ids = np.asarray(batch["input_ids"])
    length = length_bucket(input_ids.shape[1], min_length)
    padded = {"attention_mask": np.ones_like(input_ids), **batch}
    for name, value in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        if name in padded:
            array = np.asarray(padded[name])
            padded[name] = np.pad(array, ((0, 0), (length - array.shape[1], 0)), constant_values=value)
    return padded


@flax.struct.dataclass
class VisionInputs:
    patches: jax.Array  # (S, patch_dim) pixel rows in slot order, zeros in empty slots
    slot_valid: jax.Array  # (S,) bool
    segment_ids: jax.Array  # (S,) int32: frame number for full attention, -1 when empty
    rotary_hw: jax.Array  # (S, 2) int32: patch row and column inside its frame
    # Static: windows of the batch's largest frame, bucketed (0: all windows of the batch).
    frame_windows: int = flax.struct.field(pytree_node=False, default=0)


@flax.struct.dataclass
class ModelInputs:
    input_ids: jax.Array  # (B, T) int32
    attention_mask: jax.Array  # (B, T) bool
    position_ids: jax.Array  # (3, B, T) int32, M-RoPE (t, h, w)
    image_token_slot: jax.Array  # (B, T) int32: unit slot feeding each image token, 0 elsewhere
    vision: VisionInputs | None


def _windowed_slots(vcfg: VisionConfig, grid_thw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patch slot of every window: source pixel row (-1 empty), frame id, (h, w) position.

    Windows are listed image by image, frame by frame, row-major; inside a window its units
    row-major; inside a unit its 2 x 2 patches row-major (the processor's patch order).
    """
    m, wu = vcfg.spatial_merge_size, vcfg.window_units
    sources, frames, positions = [], [], []
    row_offset, frame_id = 0, 0
    for t, gh, gw in grid_thw.tolist():
        uh_n, uw_n = gh // m, gw // m
        for _ in range(t):
            nwh, nww = -(-uh_n // wu), -(-uw_n // wu)
            # Unit coordinates of every slot: (window row, window col, unit row, unit col, sub row, sub col).
            wh, ww, ih, iw, sh, sw = np.meshgrid(
                np.arange(nwh),
                np.arange(nww),
                np.arange(wu),
                np.arange(wu),
                np.arange(m),
                np.arange(m),
                indexing="ij",
            )
            uh, uw = wh * wu + ih, ww * wu + iw
            valid = (uh < uh_n) & (uw < uw_n)
            unit_index = uh * uw_n + uw
            source = row_offset + unit_index * m * m + sh * m + sw
            sources.append(np.where(valid, source, -1).reshape(-1))
            frames.append(np.where(valid, frame_id, -1).reshape(-1))
            positions.append(np.stack([uh * m + sh, uw * m + sw], axis=-1).reshape(-1, 2))
            row_offset += gh * gw
            frame_id += 1
    if not sources:  # no image (a micro-batch of packed bins without one): every slot padding
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
    return np.concatenate(sources), np.concatenate(frames), np.concatenate(positions)


def _frame_windows(vcfg: VisionConfig, grid_thw: np.ndarray) -> list[int]:
    """Attention windows of each frame of `grid_thw`, in order."""
    m, wu = vcfg.spatial_merge_size, vcfg.window_units
    return [
        -(-(h // m) // wu) * -(-(w // m) // wu)
        for t, h, w in np.asarray(grid_thw).reshape(-1, 3).tolist()
        for _ in range(t)
    ]


def count_windows(vcfg: VisionConfig, grid_thw: np.ndarray) -> int:
    """Attention windows the images of `grid_thw` fill, before bucketing."""
    return sum(_frame_windows(vcfg, grid_thw))


def largest_frame_windows(vcfg: VisionConfig, grid_thw: np.ndarray) -> int:
    """Attention windows of the largest frame of `grid_thw`, before bucketing."""
    return max(_frame_windows(vcfg, grid_thw), default=1)


def vision_inputs(
    vcfg: VisionConfig,
    pixel_values: np.ndarray,
    grid_thw: np.ndarray,
    min_windows: int = 1,
    min_frame_windows: int = 1,
) -> tuple[VisionInputs, np.ndarray]:
    """Slot layout of all images of a batch, padded to a bucket of windows. The minimums let
    several batches share one layout shape (micro-batches stack).

    Returns the inputs and, for each merged feature in HF order (image by image, units
    row-major), the index of its unit slot.
    """
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    expected_rows = int(np.prod(grid_thw, axis=1).sum())
    if pixel_values.shape != (expected_rows, vcfg.patch_dim):
        raise ValueError(
            f"pixel_values has shape {pixel_values.shape}, but image_grid_thw {grid_thw.tolist()} "
            f"needs ({expected_rows}, {vcfg.patch_dim})."
        )
    if np.any(grid_thw[:, 1:] % vcfg.spatial_merge_size):
        raise ValueError(f"image_grid_thw {grid_thw.tolist()}: h and w must be multiples of the merge size.")
    source, frame, hw = _windowed_slots(vcfg, grid_thw)
    window_slots = vcfg.window_units**2 * vcfg.merge_unit
    num_windows = bucket(count_windows(vcfg, grid_thw), min_windows)
    pad = num_windows * window_slots - len(source)
    source = np.pad(source, (0, pad), constant_values=-1)
    frame = np.pad(frame, (0, pad), constant_values=-1)
    hw = np.pad(hw, ((0, pad), (0, 0)))
    if len(pixel_values):
        patches = np.where((source >= 0)[:, None], pixel_values[np.maximum(source, 0)], 0).astype(pixel_values.dtype)
    else:  # no image: every slot padding
        patches = np.zeros((len(source), vcfg.patch_dim), pixel_values.dtype)
    # A unit's slot is found from its first patch: unit u of HF order has first pixel row 4u.
    unit_first = source[:: vcfg.merge_unit]
    unit_slot = np.full(expected_rows // vcfg.merge_unit, -1, np.int64)
    real = unit_first >= 0
    unit_slot[unit_first[real] // vcfg.merge_unit] = np.nonzero(real)[0]
    inputs = VisionInputs(
        patches=patches,
        slot_valid=source >= 0,
        segment_ids=frame.astype(np.int32),
        rotary_hw=hw.astype(np.int32),
        frame_windows=min(bucket(largest_frame_windows(vcfg, grid_thw), min_frame_windows), num_windows),
    )
    return inputs, unit_slot


def rope_index(
    input_ids: np.ndarray,
    mm_token_type_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_grid_thw: np.ndarray | None,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions (3, B, T) and rope deltas (B,), numbered as transformers numbers them.

    Only unmasked tokens are numbered (padding keeps 0). A text run continues the count on
    all three axes; an image run gets t = start, h = start + row, w = start + col over its
    merged grid, and the count then advances by max(rows, cols).
    """
    batch, length = input_ids.shape
    positions = np.zeros((3, batch, length), np.int64)
    deltas = np.zeros((batch,), np.int64)
    grids = iter(np.asarray(image_grid_thw).reshape(-1, 3).tolist() if image_grid_thw is not None else [])
    for b in range(batch):
        keep = attention_mask[b].astype(bool)
        types = mm_token_type_ids[b][keep]
        row, current = [], 0
        for kind, run in itertools.groupby(types.tolist()):
            run_length = len(list(run))
            if kind == TEXT:
                row.append(np.broadcast_to(np.arange(run_length) + current, (3, run_length)))
                current += run_length
                continue
            if kind != IMAGE:
                raise ValueError(f"mm_token_type_ids value {kind} (video) is not supported; images only.")
            t, h, w = (int(x) for x in next(grids))
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            if run_length != t * gh * gw:
                raise ValueError(
                    f"row {b}: an image run of {run_length} tokens does not match its grid {[t, h, w]} "
                    f"({t * gh * gw} tokens)."
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            row.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + current)
            current += max(gh, gw)
        numbered = np.concatenate(row, axis=1) if row else np.zeros((3, 0), np.int64)
        positions[:, b, keep] = numbered
        deltas[b] = (numbered.max() + 1 if numbered.size else 0) - int(keep.sum())
    return positions, deltas


def image_inputs(
    config: Qwen2_5_VLConfig,
    input_ids: np.ndarray,
    pixel_values=None,
    image_grid_thw=None,
    min_windows: int = 1,
    min_frame_windows: int = 1,
) -> tuple[VisionInputs | None, np.ndarray]:
    """The slot layout of the images (None without any) and, per token of `input_ids`, the unit
    slot whose feature it receives (0 at text tokens): the i-th image token in row-major order
    gets the i-th merged feature, the images taken in their order in `pixel_values`."""
    is_image = input_ids == config.image_token_id
    n_image_tokens = int(is_image.sum())
    image_token_slot = np.zeros(input_ids.shape, np.int32)
    if pixel_values is None:
        if n_image_tokens:
            raise ValueError(f"The text holds {n_image_tokens} image tokens but no pixel_values were given.")
        return None, image_token_slot
    vision, unit_slot = vision_inputs(
        config.vision, np.asarray(pixel_values), np.asarray(image_grid_thw), min_windows, min_frame_windows
    )
    if n_image_tokens != len(unit_slot):
        raise ValueError(
            f"The text holds {n_image_tokens} image tokens but the images give {len(unit_slot)} "
            "features: expand each <|image_pad|> to t*h*w/4 tokens."
        )
    image_token_slot[is_image] = unit_slot
    return vision, image_token_slot


def prepare_inputs(
    config: Qwen2_5_VLConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    mm_token_type_ids=None,
    min_windows: int = 1,
    min_frame_windows: int = 1,
) -> ModelInputs:
    """Turns the arrays an HF processor returns into static-shape `ModelInputs` (NumPy)."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}.")
    attention_mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    is_image = input_ids == config.image_token_id
    if mm_token_type_ids is None:
        # HF silently falls back to 1D positions here, which changes the logits; we derive the
        # types from the token ids instead, which is what the processor would have returned.
        mm_token_type_ids = is_image.astype(np.int64)
    mm_token_type_ids = np.asarray(mm_token_type_ids)
    vision, image_token_slot = image_inputs(
        config, input_ids, pixel_values, image_grid_thw, min_windows, min_frame_windows
    )
    positions, _ = rope_index(
        input_ids, mm_token_type_ids, attention_mask, image_grid_thw, config.vision.spatial_merge_size
    )
    return ModelInputs(
        input_ids=input_ids.astype(np.int32),
        attention_mask=attention_mask,
        position_ids=positions.astype(np.int32),
        image_token_slot=image_token_slot,
        vision=vision,
    )
