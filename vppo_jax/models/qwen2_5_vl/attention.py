"""The decoder's causal self-attention without a (T, T) array for long sequences.

    out = causal_attention(q, k, v, key_valid, block_size)   # q (B, T, H, hd), key_valid (B, T)

Query t attends to the keys s <= t with key_valid[s] (left or right padding alike). A
sequence of at most `block_size` tokens runs the dense attention (`layers.attention`, what
the port was checked against transformers with). A longer one is cut into query blocks and
key blocks: each query block runs over the key blocks with an online softmax in fp32 (the
running max, the running sum and the weighted values, rescaled as the max grows), so no
array larger than (B, H, block, block) exists. Each key-block step is rematerialised
(`jax.checkpoint`): the backward pass recomputes a block's scores instead of storing them,
and keeps only the running statistics per block.

A query row whose keys are all masked (padding) comes out as zeros here and as the mean of
the values in the dense attention; both are finite and no real token reads them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vppo_jax.models.qwen2_5_vl.layers import attention


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, block_size: int) -> jax.Array:
    """Causal grouped-query attention; returns (B, T, H * hd) in v's dtype. See the module docstring."""
    length = q.shape[1]
    if length <= block_size:
        causal = jnp.tril(jnp.ones((length, length), bool))
        return attention(q, k, v, causal[None] & key_valid[:, None, :].astype(bool))
    return blockwise_causal_attention(q, k, v, key_valid, block_size)


def blockwise_causal_attention(q, k, v, key_valid, block_size: int) -> jax.Array:
    batch, length, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    blocks = -(-length // block_size)
    padded = blocks * block_size

    def split(a):  # (B, T, ...) -> (blocks, B, block, ...), padded at the end
        a = jnp.pad(a, [(0, 0), (0, padded - length)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(batch, blocks, block_size, *a.shape[2:]), 1, 0)

    q_blocks = split(q.reshape(batch, length, num_kv, num_heads // num_kv, head_dim))
    k_blocks, v_blocks, valid_blocks = split(k), split(v), split(key_valid.astype(bool))
    positions = jnp.arange(padded).reshape(blocks, block_size)
    scale = head_dim**-0.5
    lowest = jnp.finfo(jnp.float32).min

    def query_block(inputs):
        q_block, q_positions = inputs  # (B, bq, Hkv, g, hd), (bq,)

        @jax.checkpoint
        def key_block(carry, key_inputs):
            running_max, running_sum, weighted = carry  # (B, Hkv, g, bq) x 2, (B, Hkv, g, bq, hd)
            k_block, v_block, valid, k_positions = key_inputs
            scores = jnp.einsum("bqkgd,bskd->bkgqs", q_block, k_block).astype(jnp.float32) * scale
            allowed = (k_positions[None, :] <= q_positions[:, None])[None] & valid[:, None, :]  # (B, bq, bk)
            allowed = allowed[:, None, None]
            scores = jnp.where(allowed, scores, lowest)
            new_max = jnp.maximum(running_max, scores.max(-1))
            weights = jnp.where(allowed, jnp.exp(scores - new_max[..., None]), 0.0)
            rescale = jnp.exp(running_max - new_max)
            running_sum = running_sum * rescale + weights.sum(-1)
            values = jnp.einsum("bkgqs,bskd->bkgqd", weights, v_block.astype(jnp.float32))
            return (new_max, running_sum, weighted * rescale[..., None] + values), None

        stats_shape = (batch, num_kv, num_heads // num_kv, block_size)
        init = (
            jnp.full(stats_shape, lowest, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32),
        )
        (_, total, weighted), _ = jax.lax.scan(key_block, init, (k_blocks, v_blocks, valid_blocks, positions))
        out = weighted / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]  # (B, Hkv, g, bq, hd)
        return jnp.moveaxis(out, 3, 1).astype(v.dtype)  # (B, bq, Hkv, g, hd)

    out = jax.lax.map(query_block, (q_blocks, positions))  # (blocks, B, bq, Hkv, g, hd)
    out = jnp.moveaxis(out, 0, 1).reshape(batch, padded, num_heads * head_dim)
    return out[:, :length]
