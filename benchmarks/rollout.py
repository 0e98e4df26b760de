"""Rollout speed: our compiled sampler against transformers `generate`, same weights and inputs.

A fixed tiny-but-not-trivial Qwen2.5-VL (text: hidden 256, 4 layers, 4 heads, 2 KV heads,
intermediate 768, vocab 4096; vision: depth 2, hidden 64), 32 prompts each with one
112 x 112 image, sampling at temperature 1.0 for exactly 128 new tokens, fp32 on CPU.
transformers samples with the weights we convert from it, using one torch thread per core.

Ours runs on one CPU device per core (`--devices`, default: all cores) with the prompts
split over them, the sampler's data-parallel mesh: XLA:CPU runs each of the decode step's
small matmuls on a single thread, so one device leaves the other cores mostly idle.
`--devices 1` measures the single-device sampler.

It prints both throughputs (new tokens per second of a whole rollout: vision, prefill and
decode), our compile time separately, their ratio (target >= 3x), and our decode loop's
achieved FLOP/s as a fraction of a plain jitted matmul's FLOP/s measured in the same run
(target >= 50%). That matmul does the work of one decode step at the same batch in one
call: (32 x 256) @ (256 x 16384), the step's FLOPs, as every weight of the decoder and
lm_head is a 256-row matrix. For scale it also prints a compute-bound 1024^3 matmul.
Timings are medians of interleaved repeats, after warm-up.

Run from the repository root: python -m benchmarks.rollout [--repeats 5] [--devices N]
"""

import os
import sys

from absl import app, flags, logging

from vppo_jax.io.cli import parse_flags

# A script only: its flags are read when it is imported, before JAX starts.
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rollouts of each sampler (medians).")
_DEVICES = flags.DEFINE_integer("devices", os.cpu_count(), "CPU devices for our sampler.")


app.define_help_flags()  # --help, before app.run
ARGV = parse_flags(sys.argv)
# The number of CPU devices is fixed when JAX starts: set it before importing it.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_DEVICES.value}"

import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

sys.path.insert(0, "tests")
from vppo_jax.models import qwen2_5_vl  # noqa: E402
from vppo_jax.models.qwen2_5_vl.hf_io import config_to_hf_dict  # noqa: E402
from vppo_jax.rollout import sampling  # noqa: E402

from hf_reference import processor_batch, text_ids  # noqa: E402

PROMPTS, NEW_TOKENS = 32, 128
SIZE = qwen2_5_vl.preset("small")  # the model described above; its vision tokens are hf_reference's
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = (
    getattr(SIZE.text, name)
    for name in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
    )
)
TARGET_RATIO, TARGET_FLOOR_FRACTION = 3.0, 0.5
HEAD_DIM = HIDDEN // HEADS
# Weights one token meets, every one a matrix with HIDDEN rows: q/k/v, o, gate/up/down, lm_head.
STEP_WEIGHTS = (
    LAYERS * (HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN + 3 * HIDDEN * INTERMEDIATE)
    + HIDDEN * VOCAB
)


def hf_model() -> Qwen2_5_VLForConditionalGeneration:
    raw = config_to_hf_dict(SIZE)
    raw["text_config"].update(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = Qwen2_5_VLConfig(**raw)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def decode_flops(prompt_lengths: np.ndarray) -> float:
    """FLOPs of the decode loop: 2 per weight per token, plus attention over the real context."""
    # Token t of a row (t = 0 comes from the prefill) attends to the prompt and t earlier response tokens.
    steps = np.arange(1, NEW_TOKENS)
    context = (prompt_lengths[:, None] + steps[None, :]).sum()
    return 2.0 * STEP_WEIGHTS * PROMPTS * (NEW_TOKENS - 1) + 2.0 * 2 * LAYERS * HEADS * HEAD_DIM * context


def matmul_flops_per_second(m: int, k: int, n: int, repeats: int = 50) -> float:
    """Best FLOP/s of a plain jitted fp32 (m x k) @ (k x n) matmul."""
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    return 2.0 * m * k * n / min(timed(lambda: matmul(a, b)) for _ in range(repeats))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    torch.set_num_threads(os.cpu_count())
    reference = hf_model()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        model = qwen2_5_vl.from_pretrained(directory)
    batch = processor_batch([(text_ids(8 + p % 16, p), [(112, 112)]) for p in range(PROMPTS)])
    torch_batch = {k: torch.from_numpy(v) for k, v in batch.items()}
    params = sampling.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, end_token_ids=(), pad_token_id=0)
    keys = jax.random.split(jax.random.key(0), PROMPTS)
    mesh = Mesh(np.array(jax.devices()), ("data",)) if jax.device_count() > 1 else None

    def ours():
        return sampling.generate(model, batch, keys, params, mesh).tokens

    def theirs():
        with torch.no_grad():
            return reference.generate(
                **torch_batch,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
            )

    def decode_only():
        prefilled = jax.block_until_ready(sampling.prefill(model, batch, params, mesh))
        return timed(lambda: sampling.decode(model, prefilled, keys, params, mesh).tokens)

    first_call = timed(ours)
    for _ in range(2):  # the first runs after compiling are slower (allocations)
        ours(), theirs()
    ours_times, theirs_times, decode_times = [], [], []
    for _ in range(_REPEATS.value):
        ours_times.append(timed(ours))
        theirs_times.append(timed(theirs))
        decode_times.append(decode_only())
    floor = matmul_flops_per_second(PROMPTS, HIDDEN, STEP_WEIGHTS // HIDDEN)
    peak = matmul_flops_per_second(1024, 1024, 1024)

    tokens = PROMPTS * NEW_TOKENS
    ours_time, theirs_time, decode_time = (statistics.median(t) for t in (ours_times, theirs_times, decode_times))
    achieved = decode_flops(batch["attention_mask"].sum(axis=1)) / decode_time
    ratio, fraction = theirs_time / ours_time, achieved / floor
    print(
        f"{PROMPTS} prompts x {NEW_TOKENS} new tokens, fp32, {jax.device_count()} CPU device(s), "
        f"{torch.get_num_threads()} torch threads; medians of {_REPEATS.value}"
    )
    print(f"  transformers generate: {tokens / theirs_time:8.0f} tokens/s  ({theirs_time * 1e3:.0f} ms per rollout)")
    print(f"  ours:                  {tokens / ours_time:8.0f} tokens/s  ({ours_time * 1e3:.0f} ms per rollout)")
    print(f"  our compile time:      {first_call - ours_time:8.1f} s (first call minus a compiled call)")
    print(f"  ratio: {ratio:.2f}x  (target >= {TARGET_RATIO:.0f}x)")
    print(f"  our decode loop: {decode_time / (NEW_TOKENS - 1) * 1e3:.2f} ms per step, {achieved / 1e9:.1f} GFLOP/s")
    print(
        f"  plain jitted ({PROMPTS} x {HIDDEN}) @ ({HIDDEN} x {STEP_WEIGHTS // HIDDEN}) matmul, one step's work: "
        f"{floor / 1e9:.1f} GFLOP/s, {2 * PROMPTS * STEP_WEIGHTS / floor * 1e3:.2f} ms"
    )
    print(f"  decode loop / matmul floor: {fraction:.0%}  (target >= {TARGET_FLOOR_FRACTION:.0%})")
    print(
        f"  (for scale: a 1024^3 matmul runs at {peak / 1e9:.1f} GFLOP/s; "
        f"the decode loop is {achieved / peak:.0%} of it)"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: ARGV)  # parsed above
