"""Patch-space perturbations (the paper's Random Patch Blackening and its ablations) against
NumPy constructions from their definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageFilter

from vppo_jax.vppo import perturbation

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
P, TP, C = 14, 2, 3
ROW = C * TP * P * P


def np_patchify(frames):
    """Qwen2-VL processor order, built patch by patch: 2x2 merge units, row-major inside."""
    _, _, height, width = frames.shape
    grid_h, grid_w = height // P, width // P
    rows = []
    for block_y in range(grid_h // 2):
        for block_x in range(grid_w // 2):
            for unit_y in range(2):
                for unit_x in range(2):
                    y, x = (2 * block_y + unit_y) * P, (2 * block_x + unit_x) * P
                    patch = frames[:, :, y : y + P, x : x + P]  # (T, C, 14, 14)
                    rows.append(patch.transpose(1, 0, 2, 3).reshape(-1))  # (C, T, 14, 14)
    return np.stack(rows)


def np_normalise_rows(raw_rows):
    split = raw_rows.reshape(*raw_rows.shape[:-1], C, TP * P * P)
    return ((split - MEAN[:, None]) / STD[:, None]).reshape(raw_rows.shape)


def np_denormalise_rows(rows):
    split = rows.reshape(*rows.shape[:-1], C, TP * P * P)
    return (split * STD[:, None] + MEAN[:, None]).reshape(rows.shape)


def still_image_frames(rng, height, width):
    image = rng.uniform(0.0, 1.0, (C, height, width))
    return np.stack([image, image])  # the processor repeats a still image along T


@pytest.mark.parametrize("grid", [(2, 2), (4, 6), (6, 4)])
def test_patch_image_round_trip_matches_processor_layout(grid):
    grid_h, grid_w = grid
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(TP, C, grid_h * P, grid_w * P)).astype(np.float32)
    expected_rows = np_patchify(frames)
    rows = perturbation.image_to_patches(jnp.asarray(frames))
    np.testing.assert_array_equal(np.asarray(rows), expected_rows)
    back = perturbation.patches_to_image(jnp.asarray(expected_rows), grid_h, grid_w)
    np.testing.assert_array_equal(np.asarray(back), frames)


def solid_row(raw_value):
    return np_normalise_rows(np.full((ROW,), raw_value))


def batch_with_padding(rng, rollouts=3, slots=40, valid_slots=32):
    pixel_values = rng.normal(size=(rollouts, slots, ROW)).astype(np.float32)
    patch_valid = np.zeros((rollouts, slots), bool)
    patch_valid[:, :valid_slots] = True
    return pixel_values, patch_valid


def test_blacken_patches_sets_whole_rows_to_black_only_where_valid():
    rng = np.random.default_rng(1)
    pixel_values, patch_valid = batch_with_padding(rng)
    out = np.asarray(jax.jit(perturbation.blacken_patches)(pixel_values, patch_valid, jax.random.key(0)))
    black = solid_row(0.0)
    is_black = np.all(np.abs(out - black) < 1e-6, axis=-1)
    is_original = np.all(out == pixel_values, axis=-1)
    assert np.all(is_black | is_original)
    assert np.all(is_original[~patch_valid])  # padding untouched
    np.testing.assert_allclose(np_denormalise_rows(out[is_black]), 0.0, atol=1e-6)
    # One independent mask per rollout.
    assert not np.array_equal(is_black[0], is_black[1])


def test_blacken_patches_probability():
    pixel_values = np.zeros((8, 512, ROW), np.float32)
    patch_valid = np.ones((8, 512), bool)
    out = perturbation.blacken_patches(pixel_values, patch_valid, jax.random.key(3), prob=0.3)
    fraction = float(np.mean(np.any(np.asarray(out) != 0.0, axis=-1)))
    # 4096 Bernoulli(0.3) draws: standard deviation 0.0072.
    assert abs(fraction - 0.3) < 0.03


def test_gray_mask_sets_every_valid_patch_to_128():
    rng = np.random.default_rng(2)
    pixel_values, patch_valid = batch_with_padding(rng)
    out = np.asarray(perturbation.gray_mask(pixel_values, patch_valid))
    gray = np.broadcast_to(solid_row(128 / 255), out[patch_valid].shape)
    np.testing.assert_allclose(out[patch_valid], gray, atol=1e-6)
    np.testing.assert_array_equal(out[~patch_valid], pixel_values[~patch_valid])


def normal_cdf(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_gaussian_noise_statistics_clipping_and_temporal_sharing():
    rollouts, slots = 2, 256
    raw = np.full((rollouts, slots, ROW), 0.5)
    pixel_values = np_normalise_rows(raw).astype(np.float32)
    patch_valid = np.ones((rollouts, slots), bool)
    patch_valid[:, -16:] = False
    out = np.asarray(jax.jit(perturbation.gaussian_noise)(pixel_values, patch_valid, jax.random.key(4)))
    noisy = np_denormalise_rows(out[patch_valid])
    assert noisy.min() >= -1e-5 and noisy.max() <= 1 + 1e-5
    # raw 0.5 + N(0, 189/255), clipped: P(pixel = 0) = P(pixel = 1) = Phi(-0.5 * 255/189).
    expected_clipped = normal_cdf(-0.5 * 255 / 189)
    assert abs(np.mean(noisy < 1e-5) - expected_clipped) < 0.01
    assert abs(np.mean(noisy > 1 - 1e-5) - expected_clipped) < 0.01
    frames = noisy.reshape(-1, C, TP, P * P)
    np.testing.assert_allclose(frames[:, :, 0], frames[:, :, 1], atol=1e-6)
    np.testing.assert_array_equal(out[~patch_valid], pixel_values[~patch_valid])


def np_gaussian_blur(raw_image, sigma):
    """Separable gaussian (truncated at 4 sigma), edge pixels replicated, on (..., H, W)."""
    half = int(np.ceil(4 * sigma))
    offsets = np.arange(-half, half + 1)
    taps = np.exp(-(offsets**2) / (2 * sigma**2))
    taps /= taps.sum()

    def along(image, axis):
        length = image.shape[axis]
        out = np.zeros_like(image)
        for offset, weight in zip(offsets, taps):
            index = np.clip(np.arange(length) + offset, 0, length - 1)
            out += weight * np.take(image, index, axis=axis)
        return out

    return along(along(raw_image, -1), -2)


def test_gaussian_blur_matches_numpy_blur_of_the_raw_image():
    grid_h, grid_w = 6, 8
    rng = np.random.default_rng(5)
    frames = still_image_frames(rng, grid_h * P, grid_w * P)
    pixel_values = np_normalise_rows(np_patchify(frames)).astype(np.float32)
    expected = np_normalise_rows(np_patchify(np_gaussian_blur(frames, 6.0)))
    out = jax.jit(perturbation.gaussian_blur, static_argnums=(1, 2))(pixel_values, grid_h, grid_w)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4)


def test_gaussian_blur_is_close_to_pil():
    """PIL's GaussianBlur(6) approximates the same gaussian with box passes on uint8.

    On this image sigma = 6 is PIL's closest match: mean |difference| 0.96 gray levels,
    against 1.7 for sigma 6.5 and 3.4 for sigma 5.5.
    """
    grid_h, grid_w = 8, 8
    rng = np.random.default_rng(6)
    coarse = rng.integers(0, 256, (8, 8, C), dtype=np.uint8)
    pil_image = Image.fromarray(coarse).resize((grid_w * P, grid_h * P), Image.NEAREST)
    raw = np.asarray(pil_image, np.float64).transpose(2, 0, 1) / 255
    pixel_values = np_normalise_rows(np_patchify(np.stack([raw, raw]))).astype(np.float32)
    out = perturbation.gaussian_blur(pixel_values, grid_h, grid_w, radius=6)
    ours = perturbation.patches_to_image(perturbation.denormalise(out), grid_h, grid_w)[0]
    pil = np.asarray(pil_image.filter(ImageFilter.GaussianBlur(6)), np.float64).transpose(2, 0, 1)
    difference = np.abs(np.asarray(ours) * 255 - pil)
    assert difference.mean() < 1.3 and difference.max() < 6.0


def test_gaussian_blur_keeps_a_uniform_image():
    rows = np.tile(solid_row(0.3), (16, 1)).astype(np.float32)
    out = perturbation.gaussian_blur(rows, 4, 4)
    np.testing.assert_allclose(np.asarray(out), rows, atol=1e-5)
