"""Time of the VPPO step / the GRPO step on the same batch, on this machine.

Both steps are the compiled `train_step` with old log-probs taken in-pass (the first
update on a rollout batch); VPPO adds one no-gradient forward on the blackened images
plus dependency, TAS and TGF. Target: ratio <= 1.35 (one extra forward is about a third
of forward + backward).

    python benchmarks/step.py [--rows=16] [--response=192] [--repeats=5]
"""

import statistics
import time

import jax
import numpy as np
from absl import app, flags, logging

from vppo_jax.io.cli import parse_flags
from vppo_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, init_model, preset
from vppo_jax.parallel import sharding
from vppo_jax.trainer.config import layer_loop
from vppo_jax.trainer.optimizer import make_optimizer
from vppo_jax.vppo import programs
from vppo_jax.vppo import step as step_lib
from vppo_jax.vppo.batch import build_train_batch, init_state

TARGET = 1.35
IMAGE_TOKEN = 4000


def small_config() -> Qwen2_5_VLConfig:
    """The rollout benchmark's model ("small": text hidden 256 x 4 layers, vocab 4096, vision depth 2),
    its vision tokens above the random text's ids, its layers run as the trainer runs them here."""
    config = preset(
        "small", image_token_id=IMAGE_TOKEN, video_token_id=4001, vision_start_token_id=4002, vision_end_token_id=4003
    )
    return config.with_compute(layer_loop=layer_loop("auto"))


def rollout_batch(config: Qwen2_5_VLConfig, rows: int, response: int, group: int):
    """Rows of [text, one 112 x 112 image (16 tokens), text, response], random content; the
    rows of a group share the prompt and the image."""
    rng = np.random.default_rng(0)
    image_tokens, patches = 16, 64  # 112 px = 8 x 8 patches = 4 x 4 merged tokens
    prompt = [*rng.integers(0, 3000, 20), 4002, *[IMAGE_TOKEN] * image_tokens, 4003, *rng.integers(0, 3000, 30)]
    input_ids = np.array([prompt + list(rng.integers(0, 3000, response)) for _ in range(rows)])
    response_tokens = np.zeros_like(input_ids, bool)
    response_tokens[:, len(prompt) :] = True
    rewards = rng.integers(0, 2, rows).astype(np.float32).reshape(-1, group)
    advantages = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + 1e-6)
    return build_train_batch(
        config,
        input_ids,
        np.ones_like(input_ids),
        response_tokens,
        advantages.reshape(-1),
        np.repeat(rng.standard_normal((rows // group, patches, config.vision.patch_dim)), group, 0)
        .reshape(rows * patches, -1)
        .astype(np.float32),
        np.array([[1, 8, 8]] * rows),
        prompt_group=group,  # a group's rows share the prompt and its image, as a rollout's do
    )


def compiled_step(vppo: bool, model_config, batch, group: int):
    """(compiled step, its state, compile seconds)."""
    config = step_lib.StepConfig(vppo=vppo, group_size=group)
    optimizer = make_optimizer(1e-6)
    graphdef, state = init_state(init_model(model_config), optimizer)
    start = time.perf_counter()
    mesh = sharding.single_device_mesh()
    key = jax.random.key(0)
    program = programs.train_step_program(config, optimizer, graphdef, mesh, state, batch, key)
    compiled = program.lower(state, batch, key).compile()
    return compiled, state, time.perf_counter() - start


def interleaved_medians(steps: dict, batch, repeats: int) -> dict[str, float]:
    """Median seconds per step; the variants alternate so background load hits both alike."""
    states = {name: state for name, (_, state, _) in steps.items()}
    times = {name: [] for name in steps}
    for i in range(repeats + 1):
        for name, (compiled, _, _) in steps.items():
            start = time.perf_counter()
            states[name], metrics = compiled(states[name], batch, jax.random.key(i))
            jax.block_until_ready((states[name], metrics))
            if i:  # the first round is a warm-up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_integer("rows", 16, "Rows of the batch.")
    flags.DEFINE_integer("response", 192, "Response tokens per row.")
    flags.DEFINE_integer("repeats", 5, "Timed steps of each variant (medians).")
    flags.DEFINE_integer("group", 8, "Rows per group (advantages are group-normalised).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    model_config = small_config()
    batch = rollout_batch(model_config, FLAGS.rows, FLAGS.response, FLAGS.group)
    print(
        f"batch: {FLAGS.rows} rows x {batch.inputs.input_ids.shape[-1]} tokens ({FLAGS.response} response), "
        f"one 112x112 image each; {jax.devices()[0].platform}"
    )
    steps = {name: compiled_step(name == "VPPO", model_config, batch, FLAGS.group) for name in ("GRPO", "VPPO")}
    medians = interleaved_medians(steps, batch, FLAGS.repeats)
    for name, seconds in medians.items():
        print(f"{name} step: {seconds * 1e3:.1f} ms median of {FLAGS.repeats} (compile {steps[name][2]:.1f} s)")
    ratio = medians["VPPO"] / medians["GRPO"]
    print(f"VPPO / GRPO = {ratio:.3f} ({'meets' if ratio <= TARGET else 'misses'} target <= {TARGET})")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
