"""The decoder's causal attention on TPU: splash attention, a Pallas TPU kernel.

    out = causal_attention(q, k, v, key_valid)   # as attention.causal_attention, on a TPU

attention.py's blockwise kernel is pure JAX: it computes every (query block, key block)
pair and masks the upper triangle, twice the causal attention's matmuls. Splash attention
(jax.experimental.pallas.ops.tpu.splash_attention) skips the key blocks after a query block
from a static block mask and runs the rest as one fused kernel per head, forward and backward
(its own flash backward). `attention.causal_attention` picks it when the program is lowered
for a TPU and keeps the blockwise kernel elsewhere; the tests run this module in Pallas
interpret mode on CPU.

What it attends to is `attention.causal_attention`'s: the queries are the last Tq of the Tk
keys (a static causal mask offset by Tk - Tq), and a key it may read exists (`key_valid`).
Validity goes in as segment ids, a token's own flag: a real query reads the real keys at or
before it. A padding query reads the padding keys at or before it, itself included, so its
output is finite; no real token reads it (the blockwise kernel gives zeros there, the dense
attention the mean of all values). Unlike the blockwise kernel, the kernel rounds the
probabilities to the values' dtype before their product (bf16 in training), as flash
attention on TPU does.

The kernel is a custom call the compiler cannot split over devices: under a mesh it runs in
`jax.shard_map`, each device on its rows and, where the tensor axis divides both the query
and the kv heads, on its heads (a kv head's query heads stay on its device).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from vppo_jax.parallel.sharding import per_device_attention

LANES = 128  # the kernel's blocks are multiples of the TPU's 128 lanes
LARGEST_BLOCK = 512  # tokens per query and key block at most: 512 x 512 fp32 scores fill VMEM well


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, interpret: bool = False):
    """`attention.causal_attention` with splash attention; (B, Tq, H * hd) in q's dtype.

    q (B, Tq, H, hd); k, v (B, Tk, Hkv, hd) with Tk >= Tq; key_valid (B, Tk). `interpret`
    runs the Pallas kernels in the interpreter (any backend; the tests' CPU).
    """
    batch, queries, heads, head_dim = q.shape
    valid = key_valid.astype(jnp.int32)
    # Scaled once here: the kernel takes q as it is (the blockwise kernel scales fp32 scores).
    q = (q.astype(jnp.float32) * head_dim**-0.5).astype(q.dtype)
    run = functools.partial(_causal_rows, interpret=interpret)
    return per_device_attention(run, q, k, v, valid).reshape(batch, queries, heads * head_dim)


def _causal_rows(q, k, v, valid, interpret: bool):
    """The kernel on one device's rows: (B, Tq, H, hd) from its queries and keys."""
    queries, keys, heads = q.shape[1], k.shape[1], q.shape[2]
    q_padded, k_padded = _padded(queries), _padded(keys)
    # Heads first, lengths padded to whole blocks; padded tokens are padding (segment 0), after every real query.
    to_kernel = lambda a, length: jnp.swapaxes(_pad_axis(a, 1, length), 1, 2)
    q_valid, k_valid = _pad_axis(valid[:, keys - queries :], 1, q_padded), _pad_axis(valid, 1, k_padded)
    # The same mask for every head: splash stores it once. Query i sits at key position Tk - Tq + i.
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((q_padded, k_padded), offset=keys - queries)] * heads)
    block_q, block_kv = _block(q_padded), _block(k_padded)
    # The fused backward computes dq in the dk/dv kernel: 5 matmuls per block pair instead of 7
    # (a separate dq kernel recomputes the probabilities), at the same memory (the 7B layer:
    # 0.980 GiB of temporaries by the TPU compiler, 0.978 unfused).
    blocks = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_q_dkv=block_q, block_kv_dkv=block_kv, use_fused_bwd_kernel=True
    )
    kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    out = jax.vmap(lambda q, k, v, q_ids, kv_ids: kernel(q, k, v, splash.SegmentIds(q_ids, kv_ids)))(
        to_kernel(q, q_padded), to_kernel(k, k_padded), to_kernel(v, k_padded), q_valid, k_valid
    )
    return jnp.swapaxes(out, 1, 2)[:, :queries]


def _padded(length: int) -> int:
    return -(-length // LANES) * LANES


def _block(length: int) -> int:
    """The largest block of LANES x 2^n tokens, at most LARGEST_BLOCK, that divides `length`."""
    block = LARGEST_BLOCK
    while length % block:
        block //= 2
    return block


def _pad_axis(a: jax.Array, axis: int, length: int) -> jax.Array:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, length - a.shape[axis])
    return jnp.pad(a, widths)
