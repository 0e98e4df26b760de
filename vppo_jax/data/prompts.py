"""One example -> model-ready prompt arrays: image budget, image patches, chat prompt, token ids.

    builder = PromptBuilder(
        load_tokenizer(model_dir), ImageProcessor.from_pretrained(model_dir),
        image_token_id=config.image_token_id, vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id, max_prompt_length=4096)
    prompt = builder(index, problem, answer, [pil_image])   # a `Prompt`, possibly skipped

The prompt is EasyR1's: the format template `{{ content | trim }}` + "\\n\\n" + instruction
(the paper's), each `<image>` placeholder of the problem replaced by the image (images
first when the problem has none), rendered with Qwen2.5-VL's chat template and its default
system prompt, then tokenised without extra special tokens, like the HF processor. Images go
through the recipe's budget and the model's processor (vppo_jax/models/qwen2_5_vl/image_processor.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np
import tokenizers
from PIL import Image

from vppo_jax.errors import InputError
from vppo_jax.io import paths
from vppo_jax.models.qwen2_5_vl.image_processor import ImageProcessor, fit_pixel_budget, pixel_budget_size

SYSTEM_PROMPT = "You are a helpful assistant."
INSTRUCTION = (
    "You first think through the reasoning process as an internal monologue, enclosed within <think> </think> "
    "tags. Then, provide your final answer enclosed within \\boxed{}."
)
IMAGE_PLACEHOLDER = "<image>"  # where a ViRL39K/EasyR1 problem puts its images
# The user turn around a problem, "{problem}" marking where it goes: the reference's (the
# paper's recipes) or the bare problem. data.prompt_template names one, or a text file.
PROMPT_TEMPLATES = {"reference": "{problem}\n\n" + INSTRUCTION, "plain": "{problem}"}

# Why a record was skipped; the trainer counts them per kind (vppo_jax.data.SkipCounter).
SKIP_REASONS = (
    "bad_row",  # the row could not be parsed (a malformed JSON line, a field of the wrong type)
    "missing_field",  # problem, answer or images absent or null, or an empty answer
    "empty_problem",
    "bad_image",  # undecodable or missing image file, or an image no resize can fit (aspect ratio > 200)
    "image_mismatch",  # <image> placeholders do not match the images, or vision tokens inside the text
    "too_long",  # more prompt tokens than max_prompt_length (judged from the image sizes before decoding)
)


def prompt_template(name: str) -> str:
    """The template named `name` in PROMPT_TEMPLATES, or the text of the file at path `name`
    (its final newline dropped). Raises InputError naming the choices when it is neither, or
    when the template has no {problem}."""
    if name in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[name]
    if not paths.is_file(name):
        raise InputError(
            f"data.prompt_template={name!r} is neither one of {sorted(PROMPT_TEMPLATES)} nor a file "
            "(a text file holding the user turn, with {problem} where the problem goes)."
        )
    template = paths.read_text(name).removesuffix("\n")
    if "{problem}" not in template:
        raise InputError(f"data.prompt_template={name!r} has no {{problem}}: mark where the problem goes.")
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
    if not paths.exists(path):
        raise InputError(
            f"{path} not found: pass the HF model directory (or the hf/ folder of a converted checkpoint), "
            "which must hold the fast tokenizer's tokenizer.json."
        )
    return tokenizers.Tokenizer.from_str(paths.read_text(path))


def special_tokens(tokenizer: tokenizers.Tokenizer) -> SpecialTokens:
    """Looks the chat and vision tokens up; each must encode to exactly one token."""
    names = dict(
        im_start="<|im_start|>",
        im_end="<|im_end|>",
        endoftext="<|endoftext|>",
        vision_start="<|vision_start|>",
        vision_end="<|vision_end|>",
        image_pad="<|image_pad|>",
    )
    ids = {}
    for field, text in names.items():
        encoded = tokenizer.encode(text, add_special_tokens=False).ids
        if len(encoded) != 1:
            raise InputError(
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
                raise InputError(
                    f"The model config's {name} is {model_id} but the tokenizer numbers that token {tokenizer_id}: "
                    "load the tokenizer and the model from the same checkpoint."
                )
        self.max_prompt_length = max_prompt_length
        self.template = template
        self.min_pixels = min_pixels or 0
        self.max_pixels = max_pixels or math.inf

    def image_tokens(self, sizes: Sequence[tuple[int, int]]) -> int:
        """The prompt tokens images of these (width, height) sizes expand to, known from their
        headers alone. Raises ValueError for an image no resize can fit (aspect ratio > 200)."""
        merge = self.image_processor.merge_size**2
        grids = (
            self.image_processor.grid(*pixel_budget_size(size, self.min_pixels, self.max_pixels)) for size in sizes
        )
        return sum(int(np.prod(grid)) // merge for grid in grids)

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
