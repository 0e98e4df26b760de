"""Time of the training forward on packed bins / on the padded batch of the same rollout.

Responses follow a long tail (lognormal, mean about 0.3 of the length limit, clipped to the
limit), as at the paper's lengths. The padded forward is today's update's
(`response_hidden_states`: rows left-padded to the longest prompt and right-padded to the
longest response, each prompt run once for its G samples, every row's images through the
vision tower); the packed one is `packed_hidden_states` on bins of `--budget` tokens
(vppo_jax/vppo/packing.py), then the hidden states that predict each token. Both compiled,
without and with a backward; the model is the speed benchmarks' "small" preset, the decoder
attention in blocks of `--block` tokens.

    python benchmarks/packing.py [--groups=4] [--group=8] [--limit=1024] [--budget=4096] [--repeats=3]
"""

import statistics
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from step import IMAGE_TOKEN, small_config

from vppo_jax.io.cli import parse_flags
from vppo_jax.models.qwen2_5_vl import init_model
from vppo_jax.vppo import packing
from vppo_jax.vppo.batch import build_train_batch

FLAGS = flags.FLAGS
flags.DEFINE_integer("groups", 4, "prompts in the rollout")
flags.DEFINE_integer("group", 8, "samples per prompt (G)")
flags.DEFINE_integer("limit", 1024, "the response length limit")
flags.DEFINE_integer("budget", 4096, "tokens per bin")
flags.DEFINE_integer("block", 512, "decoder attention block (model.attention_block)")
flags.DEFINE_integer("repeats", 3, "timed runs of each forward (after one compiling run)")


def rollout(groups: int, group: int, limit: int) -> list[packing.Group]:
    """Prompts of 40-200 text tokens around one 112 x 112 image (16 tokens), responses of
    lognormal lengths with mean about 0.3 * limit, clipped to [1, limit]."""
    rng = np.random.default_rng(0)
    image = [4002, *[IMAGE_TOKEN] * 16, 4003]
    out = []
    for _ in range(groups):
        prompt = np.array([*rng.integers(0, 3000, 10), *image, *rng.integers(0, 3000, rng.integers(30, 190))])
        lengths = np.clip(rng.lognormal(np.log(0.3 * limit) - 0.5, 1.0, group), 1, limit).astype(int)
        pixels = rng.standard_normal((64, small_config().vision.patch_dim)).astype(np.float32)
        responses = tuple(rng.integers(0, 3000, n) for n in lengths)
        out.append(packing.Group(prompt, responses, pixels, np.array([[1, 8, 8]])))
    return out


def padded_batch(config, groups: list[packing.Group]):
    """The rollout as the padded update lays it out (`build_train_batch`)."""
    width = max(len(g.prompt) for g in groups)
    longest = max(len(r) for g in groups for r in g.responses)
    ids, mask, response, pixels, grids = [], [], [], [], []
    for g in groups:
        for r in g.responses:
            row = np.zeros(width + longest, np.int64)
            row[width - len(g.prompt) : width + len(r)] = np.concatenate([g.prompt, r])
            ids.append(row)
            mask.append(row != 0)
            response.append((np.arange(width + longest) >= width) & (np.arange(width + longest) < width + len(r)))
            pixels.append(g.pixel_values)
            grids.append(g.image_grid_thw)
    rows = len(ids)
    return build_train_batch(
        config,
        np.stack(ids),
        np.stack(mask),
        np.stack(response),
        np.zeros(rows, np.float32),
        np.concatenate(pixels),
        np.concatenate(grids),
        response_start=width,
        prompt_group=len(groups[0].responses),
    )


def timed(function, *args) -> float:
    jax.block_until_ready(function(*args))  # compile
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(_):
    config = small_config().with_compute(attention_block=FLAGS.block)
    graphdef, params = nnx.split(init_model(config), nnx.Param)
    groups = rollout(FLAGS.groups, FLAGS.group, FLAGS.limit)
    padded = padded_batch(config, groups)
    packed = packing.pack_groups(config, groups, FLAGS.budget)
    inputs = jax.tree.map(lambda a: a[0], padded.inputs)
    window = padded.targets.shape[-1]

    def padded_hidden(params, inputs):
        return nnx.merge(graphdef, params).response_hidden_states(inputs, window, padded.prompt_group)

    def packed_hidden(params, packed):
        hidden = nnx.merge(graphdef, params).packed_hidden_states(packed.inputs, packed.layout.tree)
        return packing.predicting_hidden(hidden, packed.layout.predicted_by)

    # The backward of a sum over the response tokens' hidden states: the decoder's and vision
    # tower's whole backward, without the vocabulary projection (the same work on both sides).
    gradient = lambda hidden, mask: jax.grad(lambda p, x: (hidden(p, x).sum(-1) * mask).sum())
    forwards = jax.jit(padded_hidden), jax.jit(packed_hidden)
    backwards = (
        jax.jit(gradient(padded_hidden, padded.response_mask[0])),
        jax.jit(gradient(packed_hidden, packed.layout.response_mask)),
    )
    response_tokens = int(padded.response_mask.sum())
    print(
        f"{FLAGS.groups} groups x {FLAGS.group} samples, {response_tokens} response tokens "
        f"(mean {response_tokens / padded.response_mask[0].shape[0]:.0f}, limit {FLAGS.limit})"
    )
    print(f"padded: {inputs.input_ids.shape} tokens, {inputs.vision.slot_valid.shape[0]} patch slots")
    print(f"packed: {packed.inputs.input_ids.shape} tokens, {packed.inputs.vision.slot_valid.shape[0]} patch slots")
    for name, (padded_run, packed_run) in (("forward", forwards), ("forward + backward", backwards)):
        padded_time, packed_time = timed(padded_run, params, inputs), timed(packed_run, params, packed)
        print(
            f"{name}: padded {padded_time:.2f} s, packed {packed_time:.2f} s, speedup {padded_time / packed_time:.2f}x"
        )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
