"""Time of the VPPO step / the GRPO step on the same batch, on this machine.

Both steps are the compiled `train_step` with old log-probs taken in-pass (the first
update on a rollout batch); VPPO adds one no-gradient forward on the blackened images
plus dependency, TAS and TGF. Target: ratio <= 1.35 (one extra forward is about a third
of forward + backward).

    python benchmarks/step.py [--rows=16] [--response=192] [--repeats=5]
"""
import argparse
import statistics
import time

import jax
import numpy as np

from vppo_jax.parallel import sharding
from vppo_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, TextConfig, VisionConfig, init_model
from vppo_jax.trainer.optimizer import make_optimizer
from vppo_jax.vppo import step as step_lib
from vppo_jax.vppo.batch import build_train_batch

TARGET = 1.35
IMAGE_TOKEN = 4000


def small_config() -> Qwen2_5_VLConfig:
    """The rollout benchmark's model: text hidden 256 x 4 layers, vocab 4096, vision depth 2."""
    return Qwen2_5_VLConfig(
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=256, num_heads=4, out_hidden_size=256,
                            fullatt_block_indexes=(1,)),
        text=TextConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                        mrope_section=(8, 12, 12)),
        tie_word_embeddings=False, image_token_id=IMAGE_TOKEN, video_token_id=4001,
        vision_start_token_id=4002, vision_end_token_id=4003,
    )


def rollout_batch(config: Qwen2_5_VLConfig, rows: int, response: int, group: int):
    """Rows of [text, one 112 x 112 image (16 tokens), text, response], random content."""
    rng = np.random.default_rng(0)
    image_tokens, patches = 16, 64  # 112 px = 8 x 8 patches = 4 x 4 merged tokens
    prompt = [*rng.integers(0, 3000, 20), 4002, *[IMAGE_TOKEN] * image_tokens, 4003, *rng.integers(0, 3000, 30)]
    input_ids = np.array([prompt + list(rng.integers(0, 3000, response)) for _ in range(rows)])
    response_tokens = np.zeros_like(input_ids, bool)
    response_tokens[:, len(prompt):] = True
    rewards = rng.integers(0, 2, rows).astype(np.float32).reshape(-1, group)
    advantages = ((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + 1e-6))
    return build_train_batch(
        config, input_ids, np.ones_like(input_ids), response_tokens, advantages.reshape(-1),
        rng.standard_normal((rows * patches, config.vision.patch_dim)).astype(np.float32),
        np.array([[1, 8, 8]] * rows),
    )


def compiled_step(vppo: bool, model_config, batch, group: int):
    """(compiled step, its state, compile seconds)."""
    config = step_lib.StepConfig(vppo=vppo, group_size=group)
    optimizer = make_optimizer(1e-6)
    graphdef, state = step_lib.init_state(init_model(model_config), optimizer)
    start = time.perf_counter()
    mesh = sharding.single_device_mesh()
    jitted = step_lib.jit_train_step(config, optimizer, graphdef, mesh, sharding.train_state_shardings(
        mesh, optimizer, state), sharding.inputs_shardings(mesh, batch, leading=1))
    compiled = jitted.lower(state, batch, jax.random.key(0)).compile()
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--response", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--group", type=int, default=8)
    args = parser.parse_args()
    model_config = small_config()
    batch = rollout_batch(model_config, args.rows, args.response, args.group)
    print(f"batch: {args.rows} rows x {batch.targets.shape[-1]} tokens ({args.response} response), "
          f"one 112x112 image each; {jax.devices()[0].platform}")
    steps = {name: compiled_step(name == "VPPO", model_config, batch, args.group) for name in ("GRPO", "VPPO")}
    medians = interleaved_medians(steps, batch, args.repeats)
    for name, seconds in medians.items():
        print(f"{name} step: {seconds * 1e3:.1f} ms median of {args.repeats} (compile {steps[name][2]:.1f} s)")
    ratio = medians["VPPO"] / medians["GRPO"]
    print(f"VPPO / GRPO = {ratio:.3f} ({'meets' if ratio <= TARGET else 'misses'} target <= {TARGET})")


if __name__ == "__main__":
    main()
