"""The update step on packed micro-batches / on padded ones: the same rollout, at the paper's
lengths scaled to a CPU.

The rollout: --groups prompts of G = --group samples. A prompt is 20 to 180 text tokens
around one image of 112, 168 or 224 pixels a side (16, 36 or 64 image tokens): prompts vary
with their image, as ViRL39K's do. Responses are lognormal with mean 0.3 x --limit before
clipping to [1, limit], sigma 1: a long tail, about 4% of the rows at the limit, as a
reasoning policy's lengths sit under the paper's 2,048-token limit.

Padded: `build_train_batch`'s layout (prompts left-padded to the longest, responses
right-padded to the longest), micro-batches of as many rows as fit in --budget tokens (a
prompt counted once for its group's rows in a micro-batch, as the trainer counts). Packed:
`build_packed_train_batch`, bins of --budget tokens (GRPO: a group's prompt once for its
samples; VPPO: each row with its own prompt, for its own perturbed images). Each runs the
update as the trainer does: the scoring pass where one is needed (VPPO's global TAS over
several micro-batches), then `train_step`; each (algorithm, layout) in a fresh process, for
its own peak RSS. The model is the speed benchmarks' "small" preset, the decoder's attention
in blocks of --block tokens.

It prints per algorithm and layout the update's wall time (median of --repeats after a
compiling run), the FLOPs its programs execute on their shapes and the FLOPs of the
rollout's real tokens (vppo_jax/flops.py's convention: matrix products, a backward twice its
forward), and the peak RSS; last, `ratio: X.XXx`, the smaller of GRPO's and VPPO's speed-ups
(target >= 1.8x, executed FLOPs within 1.3x of the real tokens').

    python benchmarks/packing.py [--groups=4] [--group=8] [--limit=1024] [--budget=4096] [--repeats=3]
"""

import json
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from step import IMAGE_TOKEN, small_config

from vppo_jax import flops
from vppo_jax.io.cli import parse_flags
from vppo_jax.models.qwen2_5_vl import init_model
from vppo_jax.trainer.config import default_config, micro_batches
from vppo_jax.trainer.optimizer import make_optimizer
from vppo_jax.vppo import packing, programs
from vppo_jax.vppo import step as step_lib
from vppo_jax.vppo.batch import build_packed_train_batch, build_padded_train_batch, init_state

FLAGS = flags.FLAGS
flags.DEFINE_integer("groups", 4, "prompts in the rollout")
flags.DEFINE_integer("group", 8, "samples per prompt (G)")
flags.DEFINE_integer("limit", 1024, "the response length limit")
flags.DEFINE_integer("budget", 4096, "tokens per micro-batch (per bin, packed)")
flags.DEFINE_integer("block", 512, "decoder attention block (model.attention_block)")
flags.DEFINE_integer("repeats", 3, "timed updates of each (after one compiling run)")
flags.DEFINE_string("measure", "", "internal: ALGORITHM:LAYOUT, measured in this process")

TARGET, FLOPS_TARGET = 1.8, 1.3
ALGORITHMS, LAYOUTS = ("grpo", "vppo"), ("padded", "packed")
IMAGE_SIDES = (8, 12, 16)  # patches a side: 112, 168, 224 pixels


def rollout() -> list[packing.Group]:
    """The rollout of the module docstring, its advantages aside (random content)."""
    rng = np.random.default_rng(0)
    limit, out = FLAGS.limit, []
    for _ in range(FLAGS.groups):
        side = int(rng.choice(IMAGE_SIDES))
        image = [4002, *[IMAGE_TOKEN] * (side * side // 4), 4003]
        prompt = np.array([*rng.integers(0, 3000, 10), *image, *rng.integers(0, 3000, rng.integers(10, 170))])
        lengths = np.clip(rng.lognormal(np.log(0.3 * limit) - 0.5, 1.0, FLAGS.group), 1, limit).astype(int)
        pixels = rng.standard_normal((side * side, small_config().vision.patch_dim)).astype(np.float32)
        responses = tuple(rng.integers(0, 3000, n) for n in lengths)
        out.append(packing.Group(prompt, responses, pixels, np.array([[1, side, side]])))
    return out


def padded_micro_batches(groups: list[packing.Group], window: int) -> int:
    """The trainer's count for these padded rows: the fewest micro-batches whose rows fit in the
    budget, a group's prompt counted once in a micro-batch."""
    config = default_config()
    config.train.micro_batch_tokens = FLAGS.budget
    rows, prompt = sum(len(g.responses) for g in groups), max(len(g.prompt) for g in groups)
    return micro_batches(config, rows, prompt + window, prompt_tokens=prompt, group_size=FLAGS.group)


def update_batch(config, groups, algorithm: str, layout: str):
    rows = sum(len(g.responses) for g in groups)
    advantages = np.random.default_rng(1).normal(size=rows).astype(np.float32)
    window = max(len(r) for g in groups for r in g.responses)
    if layout == "padded":
        return build_padded_train_batch(config, groups, advantages, window, padded_micro_batches(groups, window))
    return build_packed_train_batch(config, groups, advantages, window, FLAGS.budget, rows_alone=algorithm == "vppo")


def scored(config: step_lib.StepConfig, batch) -> bool:
    micro_batches, rows = batch.targets.shape[:2]
    return step_lib.needs_scoring(config, 1, micro_batches, rows, batch.packed is not None)


def measure(algorithm: str, layout: str) -> dict:
    """This process's update: median seconds, compile seconds, peak RSS bytes."""
    model_config = small_config().with_compute(attention_block=FLAGS.block)
    batch = update_batch(model_config, rollout(), algorithm, layout)
    config = step_lib.StepConfig(vppo=algorithm == "vppo", group_size=FLAGS.group)
    optimizer = make_optimizer(1e-6)
    graphdef, state = init_state(init_model(model_config), optimizer)
    score = programs.make_score_rollouts(config, graphdef)
    step = programs.make_train_step(config, optimizer, graphdef)
    needs_scores = scored(config, batch)
    times = []
    for i in range(FLAGS.repeats + 1):
        start = time.perf_counter()
        key = jax.random.key(i)
        scored_batch = score(state.model_params, batch, key) if needs_scores else batch
        state, metrics = step(state, scored_batch, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(times[1:]),
        "first": times[0],
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def real_token_flops(config, groups, passes: int, perturbed: int) -> float:
    """The rollout's real tokens: an image and its prompt once per group, each response after
    its prompt, the vocabulary at response tokens, in `passes` forwards with the original
    images; every row whole in `perturbed` forwards (each its own perturbed image)."""
    original = perturbed_forward = 0.0
    for g in groups:
        vision = flops.vision_flops(config.vision, g.pixel_values.shape[0])
        original += vision + flops.decoder_sequence_flops(config.text, len(g.prompt))
        for r in g.responses:
            response = flops.decoder_sequence_flops(config.text, len(r), start=len(g.prompt))
            response += flops.vocabulary_flops(config.text, len(r))
            original += response
            perturbed_forward += vision + flops.decoder_sequence_flops(config.text, len(g.prompt)) + response
    return passes * original + perturbed * perturbed_forward


def executed_flops(config, groups, batch, passes: int, perturbed: int) -> float:
    """What the programs run on their shapes: every image of the layout (a padded row's own,
    a packed sequence's; each row's in the perturbed forward), the decoder over every position
    (padding and bins' tails included) and the vocabulary at every response-window position or
    slot; a packed bin's attention reads whole the key blocks its tree names."""
    vision = {id(g): flops.vision_flops(config.vision, g.pixel_values.shape[0]) for g in groups}
    if batch.packed is None:
        micro_batches, rows, window = batch.targets.shape
        prompt = batch.inputs.input_ids.shape[-1] - window
        run = np.gcd(batch.prompt_group, rows)
        decoder = micro_batches * (
            rows // run * flops.decoder_sequence_flops(config.text, prompt)
            + rows * flops.decoder_sequence_flops(config.text, window, start=prompt)
        )
        vocabulary = flops.vocabulary_flops(config.text, micro_batches * rows * window)
        images = sum(vision[id(g)] * len(g.responses) for g in groups)
        original = decoder + vocabulary + images
        whole_rows = flops.decoder_sequence_flops(config.text, prompt + window) * micro_batches * rows
        return passes * original + perturbed * (whole_rows + vocabulary + images)

    def decoder(inputs, tree):  # over whole bins, attention reading whole the key blocks the tree names
        count, length = int(np.prod(inputs.input_ids.shape[:-1])), inputs.input_ids.shape[-1]
        keys_read = tree.counts.sum() * FLAGS.block**2 if length > FLAGS.block else count * length**2
        return flops.decoder_flops(config.text, count * length, float(keys_read))

    vocabulary = flops.vocabulary_flops(config.text, batch.packed.targets.size)
    copies = [s.group for s in packing.pack_sequences(groups, FLAGS.budget)[0]]  # a sequence's prompt and image
    original = decoder(batch.inputs, batch.packed.tree) + vocabulary + sum(vision[id(groups[p])] for p in copies)
    if not perturbed:
        return passes * original
    twin = batch.packed.rows_alone  # each row its own prompt and image
    row_images = sum(vision[id(g)] * len(g.responses) for g in groups)
    return passes * original + perturbed * (decoder(twin.inputs, twin.tree) + vocabulary + row_images)


def main(_):
    logging.set_verbosity(logging.WARNING)
    if FLAGS.measure:
        print(json.dumps(measure(*FLAGS.measure.split(":"))))
        return
    model_config = small_config().with_compute(attention_block=FLAGS.block)
    groups = rollout()
    lengths = [len(r) for g in groups for r in g.responses]
    prompts = [len(g.prompt) for g in groups]
    print(
        f"{FLAGS.groups} prompts of {min(prompts)}-{max(prompts)} tokens x {FLAGS.group} samples; responses "
        f"mean {np.mean(lengths):.0f}, max {max(lengths)} (limit {FLAGS.limit}); budget {FLAGS.budget} tokens"
    )
    speedups = {}
    for algorithm in ALGORITHMS:
        config = step_lib.StepConfig(vppo=algorithm == "vppo", group_size=FLAGS.group)
        seconds = {}
        for layout in LAYOUTS:
            batch = update_batch(model_config, groups, algorithm, layout)
            command = [sys.executable, sys.argv[0], f"--measure={algorithm}:{layout}", *sys.argv[1:]]
            run = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(run.stdout.strip().splitlines()[-1])
            passes = 3 + int(scored(config, batch))  # forward + backward, and pi_old's scoring forward
            perturbed = int(config.vppo)
            real = real_token_flops(model_config, groups, passes, perturbed)
            executed = executed_flops(model_config, groups, batch, passes, perturbed)
            seconds[layout] = result["seconds"]
            shape = "x".join(map(str, batch.inputs.input_ids.shape))
            print(
                f"{algorithm} {layout}: {shape} tokens, update {result['seconds']:.2f} s "
                f"(first {result['first']:.1f} s), "
                f"executed {executed / 1e12:.2f} TFLOP = {executed / real:.2f}x the real tokens' "
                f"{real / 1e12:.2f}, peak RSS {result['peak_rss'] / 2**30:.2f} GiB"
                + (", scored first" if passes == 4 else "")
            )
        speedups[algorithm] = seconds["padded"] / seconds["packed"]
        print(f"{algorithm}: packed {speedups[algorithm]:.2f}x faster than padded")
    ratio = min(speedups.values())
    print(f"ratio: {ratio:.2f}x ({'meets' if ratio >= TARGET else 'misses'} target >= {TARGET}x)")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
