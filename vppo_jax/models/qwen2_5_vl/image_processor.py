"""The image side of Qwen2.5-VL's processor, and the recipe's image budget.

    processor = ImageProcessor.from_pretrained(model_dir)
    pixel_values, grid_thw = processor(fit_pixel_budget(image, min_pixels, max_pixels))

- `fit_pixel_budget` is EasyR1's `process_image` (verl/utils/dataset.py, used unchanged by
  the VPPO reference): an image outside [min_pixels, max_pixels] (256*28*28 .. 1280*28*28
  in the VPPO recipe) is scaled by sqrt(budget / pixels), sides truncated with int(), with
  PIL's default filter for its mode (BICUBIC; NEAREST for "P" and "1"), and only then
  converted to RGB (alpha is dropped, not composited).
- `ImageProcessor` is transformers' `Qwen2VLImageProcessorPil`, operation for operation
  (same dtypes, same rounding), so pixel_values are bit-identical to it.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from PIL import Image

from vppo_jax.errors import InputError
from vppo_jax.io import paths

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with height*width in [min_pixels, max_pixels].

    transformers' `smart_resize`, line for line (Python's round-half-to-even included).
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _scaled_to(size: tuple[int, int], pixels: float) -> tuple[int, int]:
    """(width, height) scaled to about `pixels` pixels, sides truncated as EasyR1 does."""
    scale = math.sqrt(pixels / (size[0] * size[1]))
    return int(size[0] * scale), int(size[1] * scale)


def fit_pixel_budget(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """The image scaled into [min_pixels, max_pixels] pixels and converted to RGB (EasyR1's process_image)."""
    if image.width * image.height > max_pixels:
        image = image.resize(_scaled_to(image.size, max_pixels))
    if image.width * image.height < min_pixels:
        image = image.resize(_scaled_to(image.size, min_pixels))
    return image if image.mode == "RGB" else image.convert("RGB")


def pixel_budget_size(size: tuple[int, int], min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (width, height) `fit_pixel_budget` gives an image of `size`, known without its pixels."""
    if size[0] * size[1] > max_pixels:
        size = _scaled_to(size, max_pixels)
    if size[0] * size[1] < min_pixels:
        size = _scaled_to(size, min_pixels)
    return size


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """transformers' `Qwen2VLImageProcessorPil`: one image -> (pixel_values, grid_thw).

    The defaults are the released Qwen2.5-VL preprocessor_config.json (min_pixels 3136,
    max_pixels 12845056), not the transformers class defaults (max_pixels 1003520).
    """

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2

    @classmethod
    def from_pretrained(cls, model_dir: str) -> ImageProcessor:
        """Reads preprocessor_config.json of an HF model directory; the released defaults when it is absent."""
        path = os.path.join(model_dir, "preprocessor_config.json")
        if not paths.exists(path):
            return cls()
        saved = paths.read_json(path)
        for name, expected in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
            if name in saved and not np.allclose(saved[name], expected):
                raise InputError(
                    f"{path}: {name}={saved[name]}; only the CLIP values {expected.tolist()} are supported."
                )
        # As transformers: explicit min_pixels/max_pixels override `size`.
        size = saved.get("size") or {}
        return cls(
            min_pixels=saved.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
            max_pixels=saved.get("max_pixels", size.get("longest_edge", cls.max_pixels)),
            patch_size=saved.get("patch_size", cls.patch_size),
            temporal_patch_size=saved.get("temporal_patch_size", cls.temporal_patch_size),
            merge_size=saved.get("merge_size", cls.merge_size),
        )

    def grid(self, width: int, height: int) -> np.ndarray:
        """image_grid_thw [1, gh, gw] (int64, like transformers) of an image of that size.

        Raises ValueError for an aspect ratio above 200 (smart_resize).
        """
        height, width = smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        return np.array([1, height // self.patch_size, width // self.patch_size], np.int64)

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """pixel_values (gh*gw, 3*T*p*p) float32 and image_grid_thw [1, gh, gw] (int64, like transformers).

        Raises ValueError for an aspect ratio above 200 (smart_resize).
        """
        grid = self.grid(image.width, image.height)
        height, width = (int(g) * self.patch_size for g in grid[1:])
        resized = _to_rgb(image).resize((width, height), Image.Resampling.BICUBIC)
        # transformers rescales in float64 and casts to float32 before normalising in float32.
        pixels = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
        pixels = (pixels - CLIP_MEAN) / CLIP_STD  # (H, W, C)
        return self._patchify(pixels), grid

    def _patchify(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, C) -> (gh*gw, C*T*p*p): rows in block-major order over merge_size x merge_size units."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        height, width, channels = pixels.shape
        gh, gw = height // p, width // p
        blocks = pixels.reshape(gh // m, m, p, gw // m, m, p, channels)
        blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, m, m, C, p, p)
        # One still image is a video of T identical frames.
        frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
        return frames.reshape(gh * gw, channels * t * p * p)


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")
