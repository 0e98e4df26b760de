"""The two geometries of Random Patch Blackening, measured side by side.

`blacken` (in the compiled step) blackens whole ViT patches: exactly half fully black, none
partly. `blacken_pixels` (the reference's) blackens 14-px tiles of the image before the
processor's bicubic resize to multiples of 28, so the tiles drift off the ViT grid.

1. Geometry, no model: images of ViRL39K-like sizes through the 7B recipe's pixel budget;
   the share of ViT patches fully black, partly black and 25-75% black.
2. Token dependency on the same responses: a trained tiny policy (the demo's VPPO run)
   answers synthetic scenes drawn at 90 px (the processor resizes them to 84 px, the size
   it was trained on, so the tiles drift); every response token is scored under both
   perturbations with several masks. Printed: median S_t, share of the top 20% of tokens,
   mean trajectory dependency, and how many of the tokens TGF (k = 0.4) selects under one
   geometry it also selects under the other, against two masks of the same geometry.

    python -m vppo_jax.demo --config=configs/tiny.py --workdir=runs/tiny     # the policy (once)
    python -m benchmarks.perturbation_geometry --run=runs/tiny/vppo
"""

import dataclasses

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from PIL import Image

from vppo_jax.data.images import open_image
from vppo_jax.demo.report import top_share
from vppo_jax.embedded import synthetic
from vppo_jax.eval.benchmarks import load_run
from vppo_jax.io.cli import parse_flags
from vppo_jax.models.qwen2_5_vl.image_processor import CLIP_MEAN, CLIP_STD, ImageProcessor, fit_pixel_budget
from vppo_jax.rollout.groups import sample_and_grade, train_batch
from vppo_jax.rollout.policy import prompt_builder
from vppo_jax.rollout.rewards import RewardPool
from vppo_jax.trainer import config as config_lib
from vppo_jax.trainer.config import default_config
from vppo_jax.vppo import programs, shaping
from vppo_jax.vppo.pixel_blackening import blacken_tiles, perturbed_pixel_values

GEOMETRIES = ("blacken", "blacken_pixels")


def patch_darkness(pixel_values: np.ndarray) -> np.ndarray:
    """Per ViT patch, the mean darkness (1 - raw value) of a blackened all-white image, and
    whether all its pixels are black / untouched (bicubic ringing tolerated)."""
    raw = pixel_values.reshape(len(pixel_values), 3, 2, -1)[:, :, 0] * CLIP_STD[:, None] + CLIP_MEAN[:, None]
    darkness = 1 - np.clip(raw, 0, 1)
    return darkness.mean((1, 2)), (darkness > 0.95).all((1, 2)), (darkness < 0.05).all((1, 2))


def geometry(images: int, seed: int) -> dict[str, float]:
    recipe = default_config().data
    processor, rng = ImageProcessor(), np.random.default_rng(seed)
    mean, full, untouched = [], [], []
    for _ in range(images):
        width, height = rng.integers(300, 1500, 2)
        white = fit_pixel_budget(
            Image.new("RGB", (int(width), int(height)), (255, 255, 255)), recipe.min_pixels, recipe.max_pixels
        )
        pixels, _ = processor(Image.fromarray(blacken_tiles(np.asarray(white), rng)))
        m, f, u = patch_darkness(pixels)
        mean.append(m), full.append(f), untouched.append(u)
    mean, full, untouched = map(np.concatenate, (mean, full, untouched))
    return {
        "fully black": full.mean(),
        "partly black": (~full & ~untouched).mean(),
        "25-75% black": ((mean >= 0.25) & (mean <= 0.75)).mean(),
        "mean darkness": mean.mean(),
    }


def dependency(run: str, prompts_count: int, draws: int, seed: int) -> dict[str, dict[str, float]]:
    policy, config, _ = load_run(run, None, "float32")
    builder = prompt_builder(policy, config.data.max_prompt_length)
    rows = synthetic.generate_rows(prompts_count, seed, image_size=90)
    prompts = [builder(i, r["problem"], r["answer"], [open_image(r["images"][0], "")]) for i, r in enumerate(rows)]
    sampling = config_lib.sampling_params(config, builder.special)
    keys = jax.random.split(jax.random.key(seed), len(prompts) * sampling.group_size)
    with RewardPool(1) as pool:
        grade = lambda texts, answers: pool.score_responses(texts, answers, config.reward.name, 5.0)
        groups, _ = sample_and_grade(policy, prompts, keys, sampling, grade, policy.model.config.image_token_id)
    graphdef, params = nnx.split(policy.model, nnx.Param)
    base = config_lib.step_config(config)
    scores = {}
    for name in GEOMETRIES:
        score = programs.make_score_rollouts(dataclasses.replace(base, vppo=True, perturbation=name), graphdef)
        scores[name] = []
        for draw in range(draws):
            perturbed = None
            if name == "blacken_pixels":
                perturbed = perturbed_pixel_values(
                    groups.prompts, groups.group_size, builder.image_processor, np.array([seed, draw])
                )
            advantages = np.zeros(len(groups.texts), np.float32)
            batch = train_batch(policy.model.config, groups, advantages, perturbed_pixel_values=perturbed)
            scores[name].append(np.asarray(score(params, batch, jax.random.key(draw)).dependency[0]))
        mask = np.asarray(batch.response_mask[0])
    selected = {
        name: [np.asarray(shaping.top_fraction_mask(s, mask, 0.4)) > 0 for s in scores[name]] for name in GEOMETRIES
    }
    overlap = lambda a, b: float((a & b).sum() / a.sum())
    summary = {}
    for name in GEOMETRIES:
        values = np.concatenate([s[mask] for s in scores[name]])
        trajectories = [(s * mask).sum(1) / np.maximum(mask.sum(1), 1) for s in scores[name]]
        other = GEOMETRIES[1 - GEOMETRIES.index(name)]
        summary[name] = {
            "median S_t": float(np.median(values)),
            "top-20% share": top_share(values),
            "mean trajectory S": float(np.mean(trajectories)),
            "TGF overlap, other mask same geometry": np.mean(
                [overlap(selected[name][d], selected[name][d - 1]) for d in range(1, draws)]
            ),
            "TGF overlap with the other geometry": np.mean(
                [overlap(selected[name][d], selected[other][d]) for d in range(draws)]
            ),
        }
    summary["responses"] = {
        "count": len(groups.texts),
        "tokens": int(mask.sum()),
        "accuracy": float(groups.rewards.mean()),
    }
    return summary


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("run", "runs/tiny/vppo", "A training run's workdir (the demo's VPPO run).")
    flags.DEFINE_integer("images", 200, "Images of the geometry measurement.")
    flags.DEFINE_integer("prompts", 32, "Synthetic scenes the policy answers.")
    flags.DEFINE_integer("draws", 4, "Perturbation masks per geometry.")
    flags.DEFINE_integer("seed", 0, "Seed of the images, scenes, sampling and masks.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    print(
        "geometry of blacken_pixels on ViRL39K-like images (300-1500 px) under the 7B recipe's budget "
        "(blacken: 50% fully black, 0% partly, by construction):"
    )
    for name, value in geometry(FLAGS.images, FLAGS.seed).items():
        print(f"  {name}: {100 * value:.1f}%")
    summary = dependency(FLAGS.run, FLAGS.prompts, FLAGS.draws, FLAGS.seed)
    print(f"token dependency of {summary.pop('responses')} responses of {FLAGS.run} on 90 px scenes:")
    print("| statistic | " + " | ".join(GEOMETRIES) + " |\n|---|---|---|")
    for statistic in summary["blacken"]:
        print(f"| {statistic} | " + " | ".join(f"{summary[name][statistic]:.4g}" for name in GEOMETRIES) + " |")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
