"""One example -> model-ready prompt arrays: image budget, image patches, chat prompt, token ids.

    tokenizer = processing.load_tokenizer(model_dir)
    builder = processing.PromptBuilder(
        tokenizer, processing.ImageProcessor.from_pretrained(model_dir),
        image_token_id=config.image_token_id, vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id, max_prompt_length=4096)
    prompt = builder(index, problem, answer, [pil_image])   # a `Prompt`, possibly skipped

What we follow, and from where:
- `fit_pixel_budget` is EasyR1's `process_image` (verl/utils/dataset.py, used unchanged by
  the VPPO reference): an image outside [min_pixels, max_pixels] (256*28*28 .. 1280*28*28
  in the VPPO recipe) is scaled by sqrt(budget / pixels), sides truncated with int(), with
  PIL's default filter for its mode (BICUBIC; NEAREST for "P" and "1"), and only then
  converted to RGB (alpha is dropped, not composited).
- `ImageProcessor` is transformers' `Qwen2VLImageProcessorPil`, operation for operation
  (same dtypes, same rounding), so pixel_values are bit-identical to it.
- The prompt is EasyR1's: the format template `{{ content | trim }}` + "\\n\\n" + instruction
  (the paper's), each `<image>` placeholder of the problem replaced by the image (images
  first when the problem has none), rendered with Qwen2.5-VL's chat template and its default
  system prompt, then tokenised without extra special tokens, like the HF processor.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import tokenizers
from PIL import Image

SYSTEM_PROMPT = "You are a helpful assistant."
INSTRUCTION = (
    "You first think through the reasoning process as an internal monologue, enclosed within <think> </think> "
    "tags. Then, provide your final answer enclosed within \\boxed{}."
)
IMAGE_PLACEHOLDER = "<image>"  # where a ViRL39K/EasyR1 problem puts its images
# The user turn around a problem, "{problem}" marking where it goes: the reference's (the
# paper's recipes) or the bare problem. data.prompt_template names one, or a text file.
PROMPT_TEMPLATES = {"reference": "{problem}\n\n" + INSTRUCTION, "plain": "{problem}"}

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

# Why a record was skipped; the trainer counts them per kind (vppo_jax.data.SkipCounter).
SKIP_REASONS = (
    "bad_row",  # the row could not be parsed (a malformed JSON line, a field of the wrong type)
    "missing_field",  # problem, answer or images absent or null
    "empty_problem",
    "bad_image",  # undecodable or missing image file, or an image no resize can fit (aspect ratio > 200)
    "image_mismatch",  # <image> placeholders do not match the images, or vision tokens inside the text
    "too_long",  # more prompt tokens than max_prompt_length
)


# --- images -------------------------------------------------------------------------------


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


def fit_pixel_budget(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """The image scaled into [min_pixels, max_pixels] pixels and converted to RGB (EasyR1's process_image)."""
    if image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((int(image.width * scale), int(image.height * scale)))
    if image.width * image.height < min_pixels:
        scale = math.sqrt(min_pixels / (image.width * image.height))
        image = image.resize((int(image.width * scale), int(image.height * scale)))
    return image if image.mode == "RGB" else image.convert("RGB")


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
        if not os.path.exists(path):
            return cls()
        with open(path) as f:
            saved = json.load(f)
        for name, expected in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
            if name in saved and not np.allclose(saved[name], expected):
                raise ValueError(
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

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """pixel_values (gh*gw, 3*T*p*p) float32 and image_grid_thw [1, gh, gw] (int64, like transformers).

        Raises ValueError for an aspect ratio above 200 (smart_resize).
        """
        height, width = smart_resize(
            image.height, image.width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels
        )
        resized = _to_rgb(image).resize((width, height), Image.Resampling.BICUBIC)
        # transformers rescales in float64 and casts to float32 before normalising in float32.
        pixels = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
        pixels = (pixels - CLIP_MEAN) / CLIP_STD  # (H, W, C)
        return self._patchify(pixels), np.array([1, height // self.patch_size, width // self.patch_size], np.int64)

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


# --- prompts ------------------------------------------------------------------------------


def prompt_template(name: str) -> str:
    """The template named `name` in PROMPT_TEMPLATES, or the text of the file at path `name`
    (its final newline dropped). Raises ValueError naming the choices when it is neither, or
    when the template has no {problem}."""
    if name in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[name]
    if not os.path.isfile(name):
        raise ValueError(f"data.prompt_template={name!r} is neither one of {sorted(PROMPT_TEMPLATES)} nor a file "
                         "(a text file holding the user turn, with {problem} where the problem goes).")
    with open(name) as f:
        template = f.read().removesuffix("\n")
    if "{problem}" not in template:
        raise ValueError(f"data.prompt_template={name!r} has no {{problem}}: mark where the problem goes.")
    return template


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: == on arrays is elementwise, not a bool
class Prompt:
    """One example ready for the model, or a skipped one (skip_reason set, no arrays)."""

    index: int  # row of the example in its data files (files concatenated in order)
    answer: str
    prompt_ids: np.ndarray | None = None  # (T,) int32, each <|image_pad|> expanded to t*gh*gw/4 tokens
    pixel_values: np.ndarray | None = None  # (sum of t*gh*gw, 3*2*14*14) float32, images in prompt order
    image_grid_thw: np.ndarray | None = None  # (K, 3) int64
    # The images after the recipe's pixel budget, before the processor (RGB uint8, H x W x 3):
    # what the reference's perturbation blackens (vppo_jax/vppo/pixel_blackening.py).
    images: tuple[np.ndarray, ...] = ()
    skip_reason: str | None = None  # one of SKIP_REASONS
    skip_detail: str = ""  # a sentence for the log

    @property
    def skipped(self) -> bool:
        return self.skip_reason is not None


def skipped_prompt(index: int, reason: str, detail: str, answer: str = "") -> Prompt:
    assert reason in SKIP_REASONS, reason
    return Prompt(index=index, answer=answer, skip_reason=reason, skip_detail=f"row {index}: {detail}")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the chat and vision tokens, as the tokenizer numbers them."""

    im_start: int
    im_end: int  # ends a turn: the end of a response
    endoftext: int  # Qwen's padding token
    vision_start: int
    vision_end: int
    image_pad: int


def load_tokenizer(model_dir: str) -> tokenizers.Tokenizer:
    """The tokenizer.json of an HF model directory (a transformers fast tokenizer's `.backend_tokenizer` also works)."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: pass the HF model directory (or the hf/ folder of a converted checkpoint), "
            "which must hold the fast tokenizer's tokenizer.json."
        )
    return tokenizers.Tokenizer.from_file(path)


def special_tokens(tokenizer: tokenizers.Tokenizer) -> SpecialTokens:
    """Looks the chat and vision tokens up; each must encode to exactly one token."""
    names = dict(
        im_start="<|im_start|>", im_end="<|im_end|>", endoftext="<|endoftext|>",
        vision_start="<|vision_start|>", vision_end="<|vision_end|>", image_pad="<|image_pad|>",
    )
    ids = {}
    for field, text in names.items():
        encoded = tokenizer.encode(text, add_special_tokens=False).ids
        if len(encoded) != 1:
            raise ValueError(
                f"The tokenizer does not know {text} as one special token (it encodes to {encoded}): "
                "use the tokenizer.json of a Qwen2.5-VL checkpoint."
            )
        ids[field] = encoded[0]
    return SpecialTokens(**ids)


class PromptBuilder:
    """(index, problem, answer, images) -> `Prompt`; bad examples come back skipped, never raised."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        image_processor: ImageProcessor,
        *,
        image_token_id: int,
        vision_start_token_id: int,
        vision_end_token_id: int,
        max_prompt_length: int,
        min_pixels: int | None = 256 * 28 * 28,
        max_pixels: int | None = 1280 * 28 * 28,
        template: str = PROMPT_TEMPLATES["reference"],
    ):
        """The vision token ids come from the model config; they must agree with the tokenizer.

        min_pixels/max_pixels: the recipe's image budget (`fit_pixel_budget`), applied before the
        image processor; None disables that side. template: the user turn, {problem} marking
        where the problem goes (`prompt_template`).
        """
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.special = special_tokens(tokenizer)
        for name, model_id, tokenizer_id in (
            ("image_token_id", image_token_id, self.special.image_pad),
            ("vision_start_token_id", vision_start_token_id, self.special.vision_start),
            ("vision_end_token_id", vision_end_token_id, self.special.vision_end),
        ):
            if model_id != tokenizer_id:
                raise ValueError(
                    f"The model config's {name} is {model_id} but the tokenizer numbers that token {tokenizer_id}: "
                    "load the tokenizer and the model from the same checkpoint."
                )
        self.max_prompt_length = max_prompt_length
        self.template = template
        self.min_pixels = min_pixels or 0
        self.max_pixels = max_pixels or math.inf

    def prompt_text(self, problem: str, num_images: int) -> str:
        """The chat prompt with one <|image_pad|> per image, ending with the assistant header.

        Raises ValueError when the problem's <image> placeholders are neither absent nor one per image.
        """
        placeholders = problem.count(IMAGE_PLACEHOLDER)
        if placeholders not in (0, num_images):
            raise ValueError(f"the problem has {placeholders} {IMAGE_PLACEHOLDER} placeholders for {num_images} images")
        image = "<|vision_start|><|image_pad|><|vision_end|>"
        user = self.template.replace("{problem}", problem.strip())
        user = user.replace(IMAGE_PLACEHOLDER, image) if placeholders else image * num_images + user
        return (
            f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )

    def __call__(self, index: int, problem: str, answer: str, images: Sequence[Image.Image]) -> Prompt:
        if not problem.strip():
            return skipped_prompt(index, "empty_problem", "the problem is empty", answer)
        vision_strings = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
        if any(token in problem for token in vision_strings):
            # The tokenizer would read them as vision tokens and misalign the image features.
            return skipped_prompt(index, "image_mismatch", "the problem contains a vision special token", answer)
        try:
            text = self.prompt_text(problem, len(images))
        except ValueError as error:
            return skipped_prompt(index, "image_mismatch", str(error), answer)

        patches, grids, fitted = [], [], []
        for k, image in enumerate(images):
            try:
                fitted.append(fit_pixel_budget(image, self.min_pixels, self.max_pixels))
                pixel_values, grid = self.image_processor(fitted[-1])
            except (ValueError, OSError) as error:  # aspect ratio > 200, a mode PIL cannot convert, a bad file
                detail = f"image {k} ({image.width}x{image.height}): {error}"
                return skipped_prompt(index, "bad_image", detail, answer)
            patches.append(pixel_values)
            grids.append(grid)

        ids = self._expand_images(self.tokenizer.encode(text, add_special_tokens=False).ids, grids)
        if len(ids) > self.max_prompt_length:
            detail = f"{len(ids)} prompt tokens > max_prompt_length {self.max_prompt_length}"
            return skipped_prompt(index, "too_long", detail, answer)
        patch_dim = 3 * self.image_processor.temporal_patch_size * self.image_processor.patch_size**2
        return Prompt(
            index=index,
            answer=answer,
            prompt_ids=np.asarray(ids, np.int32),
            pixel_values=np.concatenate(patches) if patches else np.zeros((0, patch_dim), np.float32),
            image_grid_thw=np.stack(grids) if grids else np.zeros((0, 3), np.int64),
            images=tuple(np.asarray(image) for image in fitted),
        )

    def _expand_images(self, ids: list[int], grids: list[np.ndarray]) -> list[int]:
        """Each <|image_pad|> -> t*gh*gw/merge^2 copies: one per merged visual token, as the HF processor does."""
        merge = self.image_processor.merge_size**2
        counts = iter(int(np.prod(grid)) // merge for grid in grids)
        expanded = []
        for token in ids:
            expanded.extend([token] * next(counts) if token == self.special.image_pad else [token])
        return expanded
