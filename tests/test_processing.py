"""The image processor and the prompt builder, against transformers' Qwen2-VL image processor
and the chat template written by hand."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from vppo_jax.data import prompts
from vppo_jax.errors import InputError
from vppo_jax.models.qwen2_5_vl import image_processor

from hf_reference import random_image

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
INSTRUCTION = (
    "You first think through the reasoning process as an internal monologue, enclosed within <think> </think> "
    "tags. Then, provide your final answer enclosed within \\boxed{}."
)
BUDGET = dict(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)  # the recipe's budget, shrunk for speed


def tiny_tokenizer(specials=QWEN_SPECIALS) -> tokenizers.Tokenizer:
    """Byte-level BPE without merges (one token per byte), the special tokens numbered from 256."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(specials))
    return tokenizer


def tiny_builder(
    tokenizer=None, max_prompt_length=4096, template=prompts.PROMPT_TEMPLATES["reference"], **budget
) -> prompts.PromptBuilder:
    tokenizer = tokenizer or tiny_tokenizer()
    return prompts.PromptBuilder(
        tokenizer,
        image_processor.ImageProcessor(),
        image_token_id=tokenizer.token_to_id("<|image_pad|>"),
        vision_start_token_id=tokenizer.token_to_id("<|vision_start|>"),
        vision_end_token_id=tokenizer.token_to_id("<|vision_end|>"),
        max_prompt_length=max_prompt_length,
        template=template,
        **(budget or BUDGET),
    )


def hf_process(image, min_pixels, max_pixels):
    out = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(images=[image], return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


# --- images ---------------------------------------------------------------------------------


def test_smart_resize_matches_transformers():
    budgets = [(56 * 56, 28 * 28 * 1280), (256 * 28 * 28, 1280 * 28 * 28), (3136, 12845056), (28 * 28, 28 * 28 * 4)]
    sizes = [(1, 1), (14, 14), (27, 29), (41, 42), (100, 1), (28, 5600), (333, 517), (1080, 1920), (4000, 3000)]
    sizes += [(h, w) for h in range(10, 400, 37) for w in range(5, 900, 89)]
    for min_pixels, max_pixels in budgets:
        for h, w in sizes:
            assert image_processor.smart_resize(h, w, 28, min_pixels, max_pixels) == hf_smart_resize(
                h, w, 28, min_pixels, max_pixels
            ), (h, w, min_pixels, max_pixels)


@pytest.mark.parametrize("height, width", [(10, 2011), (3000, 14)])
def test_smart_resize_refuses_aspect_ratio_above_200(height, width):
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200") as ours:
        image_processor.smart_resize(height, width)
    with pytest.raises(ValueError) as theirs:
        hf_smart_resize(height, width)
    assert str(ours.value) == str(theirs.value)


SIZES = [(28, 28), (15, 15), (100, 37), (333, 517), (1000, 60), (56, 2000), (600, 800)]  # square, tiny, tall, wide


@pytest.mark.parametrize("height, width", SIZES)
@pytest.mark.parametrize("min_pixels, max_pixels", [(56 * 56, 28 * 28 * 16384), (28 * 28 * 4, 28 * 28 * 64)])
def test_image_processor_matches_transformers(height, width, min_pixels, max_pixels):
    image = random_image(height, width, seed=height * width)
    pixel_values, grid = image_processor.ImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)(image)
    expected_pixels, expected_grid = hf_process(image, min_pixels, max_pixels)
    assert pixel_values.dtype == np.float32 and pixel_values.shape == expected_pixels.shape
    np.testing.assert_array_equal(pixel_values, expected_pixels)
    np.testing.assert_array_equal(grid[None], expected_grid)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_image_processor_converts_modes_like_transformers(mode):
    image = random_image(45, 70, seed=3, mode=mode)
    pixel_values, _ = image_processor.ImageProcessor()(image)
    np.testing.assert_array_equal(pixel_values, hf_process(image, 56 * 56, 28 * 28 * 16384)[0])


def test_image_processor_reads_preprocessor_config_like_transformers(tmp_path):
    # min_pixels/max_pixels override `size`, as in the released files that carry both.
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "min_pixels": 28 * 28 * 2,
                "max_pixels": 28 * 28 * 30,
                "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    ours = image_processor.ImageProcessor.from_pretrained(str(tmp_path))
    assert (ours.min_pixels, ours.max_pixels) == (28 * 28 * 2, 28 * 28 * 30)
    image = random_image(500, 300, seed=5)
    theirs = Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))(images=[image], return_tensors="np")
    np.testing.assert_array_equal(ours(image)[0], theirs["pixel_values"])
    assert image_processor.ImageProcessor.from_pretrained(str(tmp_path / "absent")) == image_processor.ImageProcessor()


def test_fit_pixel_budget_follows_easyr1():
    budget = dict(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    # Too large: scaled by sqrt(1003520 / 2e6) = 0.70835, sides truncated.
    assert image_processor.fit_pixel_budget(random_image(1000, 2000), **budget).size == (1416, 708)
    # Too small: scaled by sqrt(200704 / 5000) = 6.3357.
    assert image_processor.fit_pixel_budget(random_image(50, 100), **budget).size == (633, 316)
    # Inside the budget: untouched. Transparency is dropped (convert("RGB")), not composited on white.
    rgba = random_image(500, 600, mode="RGBA")
    fitted = image_processor.fit_pixel_budget(rgba, **budget)
    assert fitted.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(fitted), np.asarray(rgba)[..., :3])
    # Palette images are resized with NEAREST (PIL's rule for mode P): no new colours appear.
    palette = random_image(40, 30, mode="P")
    colours = {tuple(c) for c in np.asarray(palette.convert("RGB")).reshape(-1, 3)}
    resized = np.asarray(image_processor.fit_pixel_budget(palette, **budget)).reshape(-1, 3)
    assert {tuple(c) for c in resized} <= colours


# --- prompts --------------------------------------------------------------------------------


def chat(user: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def test_prompt_text_is_the_qwen_chat_template():
    builder = tiny_builder()
    assert builder.prompt_text("  What is x?\n", 1) == chat(f"{VISION}What is x?\n\n{INSTRUCTION}")
    assert builder.prompt_text("What is x?", 2) == chat(f"{VISION}{VISION}What is x?\n\n{INSTRUCTION}")
    assert builder.prompt_text("What is 1+1?", 0) == chat(f"What is 1+1?\n\n{INSTRUCTION}")
    # EasyR1 puts each image where the problem's <image> placeholder is.
    assert builder.prompt_text("<image>Find x.", 1) == chat(f"{VISION}Find x.\n\n{INSTRUCTION}")
    assert builder.prompt_text("Left <image> right <image>", 2) == chat(
        f"Left {VISION} right {VISION}\n\n{INSTRUCTION}"
    )


def test_prompt_templates_plain_and_from_a_file(tmp_path):
    plain = tiny_builder(template=prompts.prompt_template("plain"))
    assert plain.prompt_text("  What is x?\n", 1) == chat(f"{VISION}What is x?")
    (tmp_path / "mine.txt").write_text("Answer in one word: {problem}\n")
    mine = tiny_builder(template=prompts.prompt_template(str(tmp_path / "mine.txt")))
    assert mine.prompt_text("<image>What colour?", 1) == chat(f"Answer in one word: {VISION}What colour?")
    with pytest.raises(ValueError, match=r"data.prompt_template='fancy' is neither one of \['plain', 'reference'\]"):
        prompts.prompt_template("fancy")
    (tmp_path / "bad.txt").write_text("no placeholder")
    with pytest.raises(ValueError, match=r"has no \{problem\}"):
        prompts.prompt_template(str(tmp_path / "bad.txt"))


def test_prompt_ids_and_arrays():
    tokenizer = tiny_tokenizer()
    builder = tiny_builder(tokenizer)
    images = [random_image(60, 90, seed=1), random_image(200, 40, seed=2)]
    prompt = builder(7, "Which is larger?", "B", images)
    assert not prompt.skipped and prompt.index == 7 and prompt.answer == "B"

    fitted = [image_processor.fit_pixel_budget(image, **BUDGET) for image in images]
    expected_pixels, expected_grids = zip(*(hf_process(image, 56 * 56, 28 * 28 * 16384) for image in fitted))
    np.testing.assert_array_equal(prompt.pixel_values, np.concatenate(expected_pixels))
    np.testing.assert_array_equal(prompt.image_grid_thw, np.concatenate(expected_grids))
    assert prompt.image_grid_thw.shape == (2, 3)

    pads = ["<|image_pad|>" * (int(np.prod(g)) // 4) for g in prompt.image_grid_thw]
    text = chat(
        f"<|vision_start|>{pads[0]}<|vision_end|><|vision_start|>{pads[1]}<|vision_end|>"
        f"Which is larger?\n\n{INSTRUCTION}"
    )
    assert prompt.prompt_ids.dtype == np.int32
    np.testing.assert_array_equal(prompt.prompt_ids, tokenizer.encode(text, add_special_tokens=False).ids)
    assert tokenizer.decode(prompt.prompt_ids.tolist(), skip_special_tokens=False) == text


def test_text_only_prompt_has_empty_image_arrays():
    prompt = tiny_builder()(0, "What is 1+1?", "2", [])
    assert prompt.pixel_values.shape == (0, 1176) and prompt.image_grid_thw.shape == (0, 3)


@pytest.mark.parametrize(
    "problem, images, reason",
    [
        ("   \n", 1, "empty_problem"),
        ("<image> and <image>", 1, "image_mismatch"),
        ("a literal <|image_pad|> in the text", 1, "image_mismatch"),
        ("x" * 500, 1, "too_long"),
    ],
)
def test_bad_examples_are_skipped(problem, images, reason):
    prompt = tiny_builder(max_prompt_length=400)(3, problem, "a", [random_image(28, 28)] * images)
    assert prompt.skip_reason == reason and prompt.prompt_ids is None and prompt.pixel_values is None
    assert prompt.skip_detail.startswith("row 3: ")


def test_image_with_aspect_ratio_above_200_is_skipped():
    # 1 x 300 grows to 25 x 7758 under the minimum budget: no grid of 28-pixel cells fits it.
    prompt = tiny_builder(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)(0, "Q", "a", [random_image(1, 300)])
    assert prompt.skip_reason == "bad_image" and "aspect ratio" in prompt.skip_detail


def test_vision_ids_must_agree_with_the_tokenizer():
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="image_token_id is 151655 but the tokenizer numbers that token 261"):
        prompts.PromptBuilder(
            tokenizer,
            image_processor.ImageProcessor(),
            image_token_id=151655,
            vision_start_token_id=tokenizer.token_to_id("<|vision_start|>"),
            vision_end_token_id=tokenizer.token_to_id("<|vision_end|>"),
            max_prompt_length=10,
        )
    with pytest.raises(ValueError, match=r"does not know <\|im_start\|> as one special token"):
        prompts.special_tokens(tiny_tokenizer([s for s in QWEN_SPECIALS if s != "<|im_start|>"]))


def test_load_tokenizer_from_a_model_directory(tmp_path):
    tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    special = prompts.special_tokens(prompts.load_tokenizer(str(tmp_path)))
    assert (special.endoftext, special.im_start, special.im_end, special.image_pad) == (256, 257, 258, 261)
    with pytest.raises(InputError, match="tokenizer.json not found"):
        prompts.load_tokenizer(str(tmp_path / "absent"))
