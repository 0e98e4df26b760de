"""Host-side blackening with the reference's geometry, checked tile by tile and against the data pipeline."""

import numpy as np
from PIL import Image

from vppo_jax.data.prompts import PromptBuilder
from vppo_jax.embedded.tiny_model import tiny_config, train_tokenizer
from vppo_jax.models.qwen2_5_vl.image_processor import ImageProcessor
from vppo_jax.vppo.pixel_blackening import blacken_tiles, perturbed_pixel_values


def test_tiles_of_14_pixels_are_black_or_untouched_and_the_border_tiles_are_cut():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (45, 31, 3), dtype=np.uint8)  # no black pixel of its own
    out = blacken_tiles(image, np.random.default_rng(1))
    for y in range(0, 45, 14):
        for x in range(0, 31, 14):
            tile, original = out[y : y + 14, x : x + 14], image[y : y + 14, x : x + 14]
            assert (tile == 0).all() or (tile == original).all(), (y, x)
    black = [(out[y, x] == 0).all() for y in range(0, 45, 14) for x in range(0, 31, 14)]
    assert 0 < sum(black) < len(black)  # 4 x 3 tiles, about half of them black
    assert (blacken_tiles(image, rng, prob=1.0) == 0).all()
    assert (blacken_tiles(image, rng, prob=0.0) == image).all()


def test_rows_are_processed_as_the_data_pipeline_processes_the_originals_each_with_its_own_mask():
    tokenizer = train_tokenizer(["How many red squares are there? \\boxed{3}"] * 4)
    config = tiny_config(tokenizer)
    builder = PromptBuilder(
        tokenizer,
        ImageProcessor(),
        image_token_id=config.image_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        max_prompt_length=512,
        min_pixels=100 * 100,
        max_pixels=None,
    )
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)) for _ in range(2)]
    prompts = [builder(i, "How many squares?", "2", [image]) for i, image in enumerate(images)]
    assert prompts[0].images[0].shape == (88, 113, 3)  # the budget upscales 70 x 90, the processor then resizes

    untouched = perturbed_pixel_values(prompts, 3, builder.image_processor, np.array([5]), prob=0.0)
    expected = np.concatenate([p.pixel_values for p in prompts for _ in range(3)])
    np.testing.assert_array_equal(untouched, expected)

    blackened = perturbed_pixel_values(prompts, 3, builder.image_processor, np.array([5]))
    rows = blackened.reshape(6, -1, blackened.shape[-1])
    assert not np.array_equal(rows[0], rows[1])  # the G rows of a group get different masks
    np.testing.assert_array_equal(
        blackened, perturbed_pixel_values(prompts, 3, builder.image_processor, np.array([5]))
    )  # seeded
