"""Cost of top-p truncation per decode step at Qwen2.5-VL's vocabulary: our sort-free nucleus
against the sort it replaced, measured in the same run.

The paper samples with top-p 0.99 and no top-k, so every decode step truncates every row over
V = 152064 tokens. `sampling.truncate` finds the nucleus's edge by a 32-step bisection of
masked sums; the baseline sorts each row and takes the cumulative mass. Both are compared
with the nucleus computed in float64 (they may differ from it, and from each other, only by
fp32 rounding at the nucleus's edge). Rows: one device's share of a decode batch.

Run from the repository root: python -m benchmarks.top_p [--rows=64] [--top_p=0.99]
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from vppo_jax.io.cli import parse_flags
from vppo_jax.rollout import sampling

VOCAB = 152064
FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_integer("rows", 64, "Rows truncated per step (one device's share of the decode batch).")
    flags.DEFINE_float("top_p", 0.99, "Nucleus mass (the paper's rollout setting).")
    flags.DEFINE_integer("repeats", 10, "Timed calls of each (median reported).")


def sorted_nucleus(logits: jax.Array, top_p: float) -> jax.Array:
    """The baseline: sort every row, keep the tokens whose more likely tokens hold < top_p."""
    ranked = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    kept = jnp.cumsum(probs, axis=-1) - probs < top_p
    threshold = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def exact_nucleus(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The nucleus in float64 NumPy (sort and cumulative sum): which tokens each row keeps."""
    order = np.argsort(-logits, axis=-1, kind="stable")
    ranked = np.take_along_axis(logits, order, axis=-1).astype(np.float64)
    probs = np.exp(ranked - ranked[:, :1])
    probs /= probs.sum(-1, keepdims=True)
    edge = np.min(np.where(np.cumsum(probs, -1) - probs < top_p, ranked, np.inf), axis=-1, keepdims=True)
    return logits >= edge


def median_seconds(function, logits, repeats: int) -> float:
    jax.block_until_ready(function(logits))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(logits))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    top_p = FLAGS.top_p
    # Scaled normal logits: the nucleus of 0.99 is a quarter of the vocabulary, so the edge is
    # a sum over tens of thousands of small probabilities (the hard case for fp32 sums).
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((FLAGS.rows, VOCAB)) * 3, jnp.float32)
    ours = jax.jit(lambda x: sampling.truncate(x, 0, top_p))
    baseline = jax.jit(lambda x: sorted_nucleus(x, top_p))
    kept_ours, kept_sort = (np.isfinite(np.asarray(f(logits))) for f in (ours, baseline))
    exact = exact_nucleus(np.asarray(logits), top_p)
    ours_s, baseline_s = (median_seconds(f, logits, FLAGS.repeats) for f in (ours, baseline))
    print(
        f"rows {FLAGS.rows} x V {VOCAB}, top_p {top_p}, backend {jax.default_backend()}; nucleus of "
        f"{exact.sum(-1).mean():,.0f} tokens per row on average"
    )
    print(
        f"  tokens kept otherwise than the float64 nucleus: ours {(kept_ours != exact).sum()}, "
        f"the sort {(kept_sort != exact).sum()} (fp32 sums at the nucleus's edge)"
    )
    print(f"  sort-free (bisection): {1e3 * ours_s:8.1f} ms per step")
    print(f"  sort (baseline):       {1e3 * baseline_s:8.1f} ms per step")
    print(f"ratio: {baseline_s / ours_s:.2f}x (sort time / ours)")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
