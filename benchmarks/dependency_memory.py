"""Compiled temporary memory of the exact-KL token dependency, chunked vs unchunked.

VPPO spec section 1: the full-vocabulary KL "must be computed in chunks over the sequence
so that peak memory is O(chunk * V), never O(T * V)". This compiles `kl` for one 2048-token
response over Qwen2.5-VL's 152064-token vocabulary from abstract shapes (nothing is
allocated) and prints XLA's temporary-buffer size with chunking and with a single chunk
(chunk_size = T). Target: at least 8x less with chunking.

Run from the repository root: python -m benchmarks.dependency_memory [--chunk-size 128]
"""
import argparse

import jax
import jax.numpy as jnp

from vppo_jax.vppo.dependency import kl

BATCH, LENGTH, HIDDEN, VOCAB = 1, 2048, 64, 152064
TARGET_RATIO = 8.0


def temp_bytes(chunk_size):
    hidden = jax.ShapeDtypeStruct((BATCH, LENGTH, HIDDEN), jnp.float32)
    unembedding = jax.ShapeDtypeStruct((HIDDEN, VOCAB), jnp.float32)
    tokens = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)
    mask = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.bool_)
    fn = jax.jit(lambda h, hp, w, o, m: kl(h, hp, w, o, m, chunk_size=chunk_size))
    compiled = fn.lower(hidden, hidden, unembedding, tokens, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-size", type=int, default=128)
    args = parser.parse_args()
    chunked = temp_bytes(args.chunk_size)
    unchunked = temp_bytes(LENGTH)
    ratio = unchunked / max(chunked, 1)
    print(f"exact kl, B={BATCH} T={LENGTH} D={HIDDEN} V={VOCAB} on {jax.default_backend()}")
    print(f"unchunked (chunk_size={LENGTH}): temp {unchunked / 2**20:10.1f} MiB")
    print(f"chunked   (chunk_size={args.chunk_size}): temp {chunked / 2**20:10.1f} MiB")
    verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
    print(f"ratio: {ratio:.1f}x ({verdict} the {TARGET_RATIO:.0f}x target)")


if __name__ == "__main__":
    main()
