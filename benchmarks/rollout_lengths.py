"""Rollout with long-tailed response lengths: waves against continuous batching (issue 30).

The `small` preset (random weights, fp32, one CPU device), PROMPTS prompts each with one
image of its own size (56 to 168 pixels a side) and a text of 8 to 23 tokens, G = 8 samples
each, at most LIMIT new tokens. Every row's response length is forced (the sampler's
`stop_lengths`: the row ends there as at an end token) and drawn from a long tail: lognormal
with mean 0.3 * LIMIT before clipping to [1, LIMIT] (sigma 1, so about 4% of the rows run to
the limit), the distribution benchmarks/packing.py of the packing work uses.

Waves: `wave_prompts` = SLOTS / G prompts at a time, each wave running until its longest
row ends. Continuous: SLOTS decode slots, a slot taking the next row when its row ends. Both
decode SLOTS rows per step. It prints each one's wall time (prefill, decode and the copy
back; medians of --repeats after a warm-up), generated tokens per second, and decode
slot-steps per generated token (1.0: no step spent on an ended row or an empty slot; a
wave's row takes as many as its wave's longest row), then `ratio:` continuous / waves
tokens/s (target >= 2x at <= 1.3 slot-steps per token).

Run from the repository root: python -m benchmarks.rollout_lengths [--repeats 3]
"""

import sys

from absl import app, flags, logging

from vppo_jax.io.cli import parse_flags

_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rollouts of each sampler (medians).")

app.define_help_flags()
ARGV = parse_flags(sys.argv)

import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, "tests")
from vppo_jax.models import qwen2_5_vl  # noqa: E402
from vppo_jax.rollout import continuous, sampling  # noqa: E402

from hf_reference import processor_batch, text_ids  # noqa: E402

PROMPTS, GROUP, LIMIT, SLOTS = 32, 8, 256, 16
TARGET_RATIO, TARGET_SLOT_STEPS = 2.0, 1.3


def response_lengths(rows: int, rng: np.random.Generator) -> np.ndarray:
    """Lognormal lengths with mean 0.3 * LIMIT (before clipping), clipped to [1, LIMIT]."""
    return np.clip(rng.lognormal(np.log(0.3 * LIMIT) - 0.5, 1.0, rows), 1, LIMIT).astype(np.int32)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    model = qwen2_5_vl.init_model(qwen2_5_vl.preset("small"))
    sides = (56, 112, 168)
    batch = processor_batch([(text_ids(8 + p % 16, p), [(sides[p % 3], sides[(p // 3) % 3])]) for p in range(PROMPTS)])
    rows = PROMPTS * GROUP
    stops = response_lengths(rows, np.random.default_rng(0))
    keys = jax.random.split(jax.random.key(0), rows)
    params = sampling.SamplingParams(
        max_new_tokens=LIMIT, temperature=1.0, end_token_ids=(), pad_token_id=0, group_size=GROUP
    )
    waves_params = dataclasses.replace(params, wave_prompts=SLOTS // GROUP)
    slots_params = dataclasses.replace(params, continuous_slots=SLOTS)

    def waves():
        return sampling.generate(model, batch, keys, waves_params, stop_lengths=stops).mask

    def slots():
        return continuous.decode(model, sampling.prefill(model, batch, slots_params), keys, slots_params, None, stops)

    _, mask = timed(waves)
    _, (rollout, loop_steps) = timed(slots)  # warm-up: compiles both
    np.testing.assert_array_equal(np.asarray(mask).sum(axis=1), stops)
    np.testing.assert_array_equal(np.asarray(rollout.mask), np.asarray(mask))
    times = {"waves": [], "continuous": []}
    for _ in range(_REPEATS.value):
        times["waves"].append(timed(waves)[0])
        times["continuous"].append(timed(slots)[0])

    tokens = int(stops.sum())
    # A wave's rows each take as many slot-steps as its longest row (the first token, from the
    # prefill's logits, counted as a step, as continuous batching samples it in one).
    wave_slot_steps = int((stops.reshape(-1, SLOTS).max(axis=1) * SLOTS).sum())
    slot_steps = {"waves": wave_slot_steps, "continuous": int(np.asarray(loop_steps).sum()) * SLOTS}
    print(
        f"{PROMPTS} prompts x {GROUP} samples, at most {LIMIT} new tokens, {tokens} generated "
        f"(mean {stops.mean():.0f}, {np.mean(stops == LIMIT):.0%} at the limit); {SLOTS} rows per decode step; "
        f"fp32, 1 CPU device; medians of {_REPEATS.value}"
    )
    speed = {}
    for name in ("waves", "continuous"):
        wall = statistics.median(times[name])
        speed[name] = tokens / wall
        print(
            f"  {name:<10}  {wall:7.2f} s  {speed[name]:8.0f} tokens/s  "
            f"{slot_steps[name] / tokens:.2f} slot-steps per token"
        )
    print(
        f"ratio: {speed['continuous'] / speed['waves']:.2f}x  "
        f"(target >= {TARGET_RATIO:.0f}x at <= {TARGET_SLOT_STEPS} slot-steps per token)"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: ARGV)
