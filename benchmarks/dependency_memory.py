"""Compiled temporary memory of the vocabulary-sized computations, chunked vs unchunked.

The exact estimator of token dependency: the full-vocabulary KL "must be computed in chunks over the sequence
so that peak memory is O(chunk * V), never O(T * V)". This compiles the exact `kl` token
dependency for one 2048-token response over Qwen2.5-VL's 152064-token vocabulary from
abstract shapes (nothing is allocated) and prints XLA's temporary-buffer size with
chunking and with a single chunk (chunk_size = T); the target is at least 8x less.
It also prints the same figures for the gradient of `token_logprobs_and_entropy` (the
loss's log-probs), whose backward pass recomputes each chunk's logits.

Run from the repository root: python -m benchmarks.dependency_memory [--chunk-size N]
"""

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from vppo_jax.io.cli import parse_flags
from vppo_jax.vppo.dependency import kl
from vppo_jax.vppo.logprobs import DEFAULT_CHUNK_SIZE, token_logprobs_and_entropy

BATCH, LENGTH, HIDDEN, VOCAB = 1, 2048, 64, 152064
TARGET_RATIO = 8.0

HIDDEN_STATES = jax.ShapeDtypeStruct((BATCH, LENGTH, HIDDEN), jnp.float32)
UNEMBEDDING = jax.ShapeDtypeStruct((HIDDEN, VOCAB), jnp.float32)
TOKENS = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)
MASK = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.bool_)


def exact_kl_temp_bytes(chunk_size):
    fn = jax.jit(lambda h, hp, w, o, m: kl(h, hp, w, o, m, chunk_size=chunk_size))
    compiled = fn.lower(HIDDEN_STATES, HIDDEN_STATES, UNEMBEDDING, TOKENS, MASK).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def logprob_grad_temp_bytes(chunk_size):
    def summed(h, w, o):
        logp, entropy = token_logprobs_and_entropy(h, w, o, chunk_size=chunk_size)
        return logp.sum() + entropy.sum()

    fn = jax.jit(jax.grad(summed, argnums=(0, 1)))
    compiled = fn.lower(HIDDEN_STATES, UNEMBEDDING, TOKENS).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def report(title, temp_bytes, chunk_size):
    unchunked, chunked = temp_bytes(LENGTH), temp_bytes(chunk_size)
    ratio = unchunked / max(chunked, 1)
    print(title)
    print(f"  unchunked (chunk_size={LENGTH}): temp {unchunked / 2**20:9.1f} MiB")
    print(f"  chunked   (chunk_size={chunk_size}): temp {chunked / 2**20:9.1f} MiB")
    print(f"  ratio: {ratio:.2f}x less with chunking")
    return ratio


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_integer("chunk-size", DEFAULT_CHUNK_SIZE, "Sequence positions per chunk of the chunked variant.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    chunk_size = FLAGS["chunk-size"].value
    print(f"B={BATCH} T={LENGTH} D={HIDDEN} V={VOCAB}, fp32, backend {jax.default_backend()}")
    ratio = report("exact kl token dependency (forward)", exact_kl_temp_bytes, chunk_size)
    report("token_logprobs_and_entropy (gradient w.r.t. h and W)", logprob_grad_temp_bytes, chunk_size)
    verdict = "meets" if ratio >= TARGET_RATIO else "is BELOW"
    print(f"exact kl {verdict} the {TARGET_RATIO:.0f}x target ({ratio:.2f}x)")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
