"""Image perturbations I -> I' in Qwen2.5-VL patch space (the paper's Random Patch Blackening
and its ablations).

VPPO measures how much each response token depends on the image by comparing the policy
with the original image I and with a perturbed image I'. The paper's perturbation is
Random Patch Blackening: every 14x14 pixel patch is set to black independently with
probability 0.5. Its ablations are gaussian noise (std 189 on 0..255 pixels), gaussian
blur (radius 6) and a full gray mask (value 128).

Everything here acts on the processor output, `pixel_values`, so it runs inside the
compiled step with a JAX PRNG key. Each row of `pixel_values` is one ViT patch, flattened
from the layout (channel C=3, temporal T=2, 14, 14) and normalised per channel with the
CLIP mean and std. Blackening a row therefore blackens exactly one 14x14 patch (both
temporal copies of a still image), which is the paper's definition.

Batching: the patch-wise functions accept any leading axes, e.g. pixel_values
(R, S, 1176) with patch_valid (R, S) for R rollouts, and take ONE key. Their random
draws have the full shape of `patch_valid`, so every rollout gets its own independent
mask/noise (the reference draws a different mask for each of the G rollouts of a group).
Rows where `patch_valid` is False are padding and are returned unchanged.
"""

import jax
import jax.numpy as jnp
import numpy as np

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
CHANNELS = 3
PATCH_DIM = CHANNELS * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176

# Qwen2-VL processor normalisation (the OpenAI CLIP constants), raw pixels scaled to [0, 1].
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _split_channels(rows):
    """(..., 1176) -> (..., C, T, 14*14): the per-row layout is channel-major."""
    return rows.reshape(*rows.shape[:-1], CHANNELS, TEMPORAL_PATCH_SIZE, PATCH_SIZE * PATCH_SIZE)


def _merge_channels(split):
    return split.reshape(*split.shape[:-3], PATCH_DIM)


def _per_channel(values):
    """A per-channel constant broadcast against the (..., C, T, 14*14) split layout."""
    return jnp.asarray(values, jnp.float32)[:, None, None]


def normalise(raw_rows):
    """Raw [0, 1] pixels -> processor-normalised values, per channel."""
    split = _split_channels(raw_rows)
    return _merge_channels((split - _per_channel(CLIP_MEAN)) / _per_channel(CLIP_STD))


def denormalise(pixel_values):
    """Processor-normalised values -> raw [0, 1] pixels, per channel."""
    split = _split_channels(pixel_values.astype(jnp.float32))
    return _merge_channels(split * _per_channel(CLIP_STD) + _per_channel(CLIP_MEAN))


def _solid_row(raw_value):
    """The normalised patch row of a uniform raw colour (raw_value in [0, 1])."""
    return normalise(jnp.full((PATCH_DIM,), raw_value, jnp.float32))


def _replace_rows(pixel_values, replace, new_rows):
    """Rows where `replace` is True take `new_rows`; the others (and the dtype) are kept."""
    return jnp.where(replace[..., None], new_rows, pixel_values).astype(pixel_values.dtype)


def blacken_patches(pixel_values, patch_valid, key, prob=0.5):
    """Random Patch Blackening: each valid patch becomes black w.p. `prob`.

    Args:
      pixel_values: (..., S, 1176) normalised patch rows.
      patch_valid: (..., S) bool, False on padding rows.
      key: one PRNG key; the Bernoulli mask is drawn with shape `patch_valid.shape`, so
        every leading index (rollout) gets an independent mask.
      prob: blackening probability (0.5 in the paper).
    Returns:
      pixel_values with the chosen rows set to (0 - mean_c) / std_c per channel.
    """
    blacken = jax.random.bernoulli(key, prob, patch_valid.shape) & patch_valid
    return _replace_rows(pixel_values, blacken, _solid_row(0.0))


def gray_mask(pixel_values, patch_valid, gray_level=128):
    """Full gray mask ablation: every valid patch becomes the uniform colour gray_level/255."""
    return _replace_rows(pixel_values, patch_valid, _solid_row(gray_level / 255.0))


def gaussian_noise(pixel_values, patch_valid, key, std=189.0):
    """Gaussian noise ablation: raw pixels + N(0, std) on the 0..255 scale, clipped, renormalised.

    The noise is drawn per raw pixel and shared by the two temporal copies in a row, since
    the reference adds it to the single still image before the processor duplicates it.
    The reference also truncates to uint8 afterwards; that quantisation (< 1/255) is not
    reproduced. Same batching convention as `blacken_patches`.
    """
    raw = _split_channels(denormalise(pixel_values))
    noise_shape = (*raw.shape[:-2], 1, raw.shape[-1])  # one draw per (patch, channel, pixel)
    noise = jax.random.normal(key, noise_shape, jnp.float32) * (std / 255.0)
    noisy = normalise(_merge_channels(jnp.clip(raw + noise, 0.0, 1.0)))
    return _replace_rows(pixel_values, patch_valid, noisy)


def patches_to_image(patches, grid_h, grid_w):
    """Inverse of the Qwen2-VL processor's patchify, for ONE image.

    The processor orders patches block-major over 2x2 merge units: the (grid_h, grid_w)
    patch grid is viewed as (grid_h/2, 2, grid_w/2, 2) and transposed so each 2x2 unit is
    4 consecutive rows.

    Args:
      patches: (grid_h * grid_w, 1176) rows of one image.
      grid_h, grid_w: the patch grid (static ints, both even).
    Returns:
      (T, C, grid_h * 14, grid_w * 14) frames (T = 2 identical copies for a still image).
    """
    blocks = patches.reshape(
        grid_h // MERGE_SIZE,
        grid_w // MERGE_SIZE,
        MERGE_SIZE,
        MERGE_SIZE,
        CHANNELS,
        TEMPORAL_PATCH_SIZE,
        PATCH_SIZE,
        PATCH_SIZE,
    )
    # (bh, bw, mh, mw, C, T, py, px) -> (T, C, bh, mh, py, bw, mw, px)
    image = blocks.transpose(5, 4, 0, 2, 6, 1, 3, 7)
    return image.reshape(TEMPORAL_PATCH_SIZE, CHANNELS, grid_h * PATCH_SIZE, grid_w * PATCH_SIZE)


def image_to_patches(image):
    """The Qwen2-VL processor's patchify for ONE image: (T, C, H, W) -> (H/14 * W/14, 1176)."""
    _, _, height, width = image.shape
    grid_h, grid_w = height // PATCH_SIZE, width // PATCH_SIZE
    units = image.reshape(
        TEMPORAL_PATCH_SIZE,
        CHANNELS,
        grid_h // MERGE_SIZE,
        MERGE_SIZE,
        PATCH_SIZE,
        grid_w // MERGE_SIZE,
        MERGE_SIZE,
        PATCH_SIZE,
    )
    # (T, C, bh, mh, py, bw, mw, px) -> (bh, bw, mh, mw, C, T, py, px)
    return units.transpose(2, 5, 3, 6, 1, 0, 4, 7).reshape(grid_h * grid_w, PATCH_DIM)


def gaussian_kernel(sigma, truncate=4.0):
    """Normalised 1-D gaussian taps on [-ceil(truncate*sigma), ceil(truncate*sigma)]."""
    half = int(np.ceil(truncate * sigma))
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _blur_last_axis(frames, taps):
    """Convolve along the last axis with edge replication (what PIL's box blur does at borders)."""
    half = taps.shape[0] // 2
    pad = [(0, 0)] * (frames.ndim - 1) + [(half, half)]
    padded = jnp.pad(frames, pad, mode="edge")
    length = frames.shape[-1]
    return sum(weight * padded[..., i : i + length] for i, weight in enumerate(taps.tolist()))


def gaussian_blur(pixel_values, grid_h, grid_w, radius=6.0):
    """Gaussian blur ablation on ONE image's patch rows (the paper's ablation, radius 6).

    A blur mixes pixels across patch borders, so the rows are reassembled into the image
    first. The filter is a separable gaussian with sigma = radius (PIL's GaussianBlur
    convention; PIL approximates it with three box passes, this is the exact kernel,
    truncated at 4 sigma). Borders replicate the edge pixel, as PIL does.

    The kernel sums to one, so it commutes with the per-channel affine normalisation:
    blurring normalised values equals normalising blurred raw pixels, and no round trip
    through raw pixels is needed (a blur of [0, 1] pixels stays in [0, 1], so no clip).
    """
    taps = gaussian_kernel(radius)
    frames = patches_to_image(pixel_values.astype(jnp.float32), grid_h, grid_w)
    blurred_w = _blur_last_axis(frames, taps)
    blurred = jnp.swapaxes(_blur_last_axis(jnp.swapaxes(blurred_w, -1, -2), taps), -1, -2)
    return image_to_patches(blurred).astype(pixel_values.dtype)


PERTURBATIONS = ("blacken", "blacken_pixels", "noise", "gray")


def perturb_images(kind: str, inputs, key, blacken_prob: float = 0.5, perturbed_patches=None):
    """ModelInputs with their images replaced by I', in patch space: an independent draw per
    patch slot, hence per rollout (each rollout's image occupies its own slots).
    "blacken_pixels" takes the patches the host blackened (`TrainBatch.perturbed_patches`)."""
    vision = inputs.vision
    if kind == "blacken_pixels":
        if perturbed_patches is None:
            raise ValueError(
                "perturbation='blacken_pixels' blackens the images on the host: build the batch with "
                "build_train_batch(perturbed_pixel_values=...)."
            )
        patches = perturbed_patches
    elif kind == "blacken":
        patches = blacken_patches(vision.patches, vision.slot_valid, key, blacken_prob)
    elif kind == "noise":
        patches = gaussian_noise(vision.patches, vision.slot_valid, key)
    elif kind == "gray":
        patches = gray_mask(vision.patches, vision.slot_valid)
    else:
        raise ValueError(f"perturbation={kind!r}; choose one of {PERTURBATIONS}.")
    return inputs.replace(vision=vision.replace(patches=patches))
