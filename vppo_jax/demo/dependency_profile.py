"""Where visual dependency lives in a policy's answers to the reasoning task, per kind of token.

Samples answers from the embedded default's policy (the warm start, before any RL), scores each
token's S_t with the demo's own measurement (vppo_jax/demo/run.py: `dependency_samples`), and
splits the tokens by what they are in the worked answer:

  perception  the two counts read from the image ("red triangles: 2.": the 2)
  reasoning   every other token (the arithmetic, the format, the boxed answer)

VPPO's premise (the paper's Figure 3) holds when a small share of the tokens holds most of the
dependency and the reasoning tokens sit near zero; that is what this prints.

    python -m vppo_jax.demo.dependency_profile --config=configs/tiny_reasoning.py --workdir=runs/reasoning
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from vppo_jax.demo.report import DependencySample, tokens_html, top_share
from vppo_jax.demo.run import dependency_samples
from vppo_jax.embedded.assets import prepare_embedded_default
from vppo_jax.io import paths
from vppo_jax.io.cli import run_program
from vppo_jax.trainer.trainer import Trainer

# A perception step of reasoning.py's worked answers: "<colour> <shape>s: <count>."
PERCEPTION = re.compile(r"[a-z]+ [a-z]+s: (-?\d+)\.")
MASS = 0.8  # "the fewest tokens that hold 80% of the total dependency"


def perception_mask(tokens: list[str]) -> np.ndarray:
    """Which tokens overlap the count of a perception step in the text they decode to."""
    text = "".join(tokens)
    counted = np.zeros(len(text), bool)
    for match in PERCEPTION.finditer(text):
        counted[match.start(1) : match.end(1)] = True
    ends = np.cumsum([len(t) for t in tokens])
    return np.array([counted[end - len(t) : end].any() for t, end in zip(tokens, ends)], bool)


def share_holding(values: np.ndarray, mass: float = MASS) -> float:
    """The smallest share of tokens whose S_t add up to `mass` of the total."""
    values = np.sort(np.asarray(values, np.float64))[::-1]
    cumulative = np.cumsum(values) / values.sum()
    return float((np.searchsorted(cumulative, mass) + 1) / len(values))


def profile(samples: list[DependencySample]) -> dict:
    values = np.concatenate([s.dependency for s in samples])
    perception = np.concatenate([perception_mask(s.tokens) for s in samples])
    return {
        "responses": len(samples),
        "tokens": len(values),
        "accuracy": float(np.mean([s.reward for s in samples])),
        "perception_tokens": int(perception.sum()),
        f"share_of_tokens_holding_{MASS:.0%}": share_holding(values),
        "top_20%_share": top_share(values),
        "mean_S_perception": float(values[perception].mean()),
        "mean_S_reasoning": float(values[~perception].mean()),
        "median_S_perception": float(np.median(values[perception])),
        "median_S_reasoning": float(np.median(values[~perception])),
        "perception_share_of_total": float(values[perception].sum() / values.sum()),
        "top_tokens": _top_tokens(samples, values),
    }


def _top_tokens(samples: list[DependencySample], values: np.ndarray, count: int = 15) -> list[str]:
    """The tokens with the highest S_t, each after the three tokens before it: which steps of
    the answer the dependency sits on when it is not on the counts."""
    contexts = ["".join(s.tokens[max(i - 3, 0) : i]) + f"[{t}]" for s in samples for i, t in enumerate(s.tokens)]
    return [f"{contexts[i]} {values[i]:.3g}" for i in np.argsort(values)[::-1][:count]]


FLAGS = flags.FLAGS


def define_flags():
    config_flags.DEFINE_config_file("config", None, "configs/tiny_reasoning.py")
    flags.DEFINE_string("workdir", None, "The embedded default's workdir (its assets are made there once).")
    flags.DEFINE_integer("prompts", 32, "Validation problems to sample answers for (group_size answers each).")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = prepare_embedded_default(FLAGS.config, FLAGS.workdir)
    trainer = Trainer(config, os.path.join(FLAGS.workdir, "dependency_profile"))
    samples = dependency_samples(trainer, FLAGS.prompts, jax.random.key(config.train.seed + 1))
    numbers = profile(samples)
    paths.write_json(os.path.join(FLAGS.workdir, "dependency_profile.json"), numbers, indent=1)
    tokens_html(samples, os.path.join(FLAGS.workdir, "dependency_profile.html"))
    for name, value in numbers.items():
        print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
    print(f"tokens coloured by S_t: {os.path.join(FLAGS.workdir, 'dependency_profile.html')}")


if __name__ == "__main__":
    define_flags()
    run_program(main)
