"""Attention without a (queries, keys) array, for the decoder and the vision tower alike.

    out = causal_attention(q, k, v, key_valid, block_size)   # the decoder: q (B, T, H, hd), key_valid (B, T)
    out = block_attention(q, k, v, index, key_valid, segments=..., positions=...)   # the kernel

On a TPU the decoder's `causal_attention` is splash attention instead, a Pallas kernel that
skips the masked upper triangle (tpu_attention.py): the choice is made when the program is
lowered, by the platform it is lowered for, so the same model code runs here on CPU and
compiles for a TPU topology from a CPU host.

`block_attention` takes queries in blocks and, for each query block, the key blocks it reads
(`index`): a decoder query block reads every key block of its rows, a vision query window
the windows of its frame (`vision.VisionAttention`), a block of packed sequences the blocks
it can see (packed.py). Which keys a query attends to comes from per-token flags, never from
a dense mask: the key exists (`key_valid`), has the query's segment id (vision: one segment
per frame; packed: one per sequence), for causal attention a position at or before the
query's and, for a prompt packed with its samples, the prompt's branch or the query's. Over
its key blocks a query block runs an online softmax in fp32 (the running max, the running
sum and the weighted values, rescaled as the max grows), so no array larger than (query
block, key block) per head and row exists.

The backward pass is flash attention's, written by hand (`jax.custom_vjp`): it keeps the
output and each query's log-sum-exp, and recomputes each block's probabilities from them key
block by key block. Autodiff through the online softmax would keep the running statistics
and weighted values of every (query block, key block) step: for the 7B vision tower at
980 x 980, 128 steps of 40 MiB of fp32 values per full-attention layer.

The dense attention (`layers.attention`), what the port was checked against transformers
with, runs where all keys of a query fit in one block: the decoder's sequences of at most
`block_size` tokens, and (vision.py) frames whose look-ahead (the largest frame's windows,
bucketed) holds at most `model.attention_block` patch slots.
A query with no key it may attend to (padding) comes out as zeros here and as the mean of
the values in the dense attention; both are finite and no real token reads them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vppo_jax.models.qwen2_5_vl import tpu_attention
from vppo_jax.models.qwen2_5_vl.layers import attention

LOWEST = jnp.finfo(jnp.float32).min
TINY = jnp.finfo(jnp.float32).tiny


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, block_size: int) -> jax.Array:
    """Causal grouped-query attention; returns (B, Tq, H * hd) in v's dtype. See the module docstring.

    k, v and key_valid cover Tk >= Tq positions, and the queries are the last Tq of them: a
    query at position Tk - Tq + i attends to the keys at or before it (Tq = Tk: plain
    self-attention; Tq < Tk: a suffix attending to a prefix computed elsewhere as well).
    Lowered for a TPU: splash attention (tpu_attention.py); for anything else: the dense
    attention up to `block_size` keys, the blockwise kernel beyond.
    """
    portable = functools.partial(portable_causal_attention, block_size=block_size)
    return jax.lax.platform_dependent(q, k, v, key_valid, tpu=tpu_attention.causal_attention, default=portable)


def portable_causal_attention(q, k, v, key_valid, block_size: int) -> jax.Array:
    """`causal_attention` in plain JAX, on any backend: dense or blockwise by the key count."""
    queries, length = q.shape[1], k.shape[1]
    if length <= block_size:
        causal = jnp.tril(jnp.ones((queries, length), bool), k=length - queries)
        return attention(q, k, v, causal[None] & key_valid[:, None, :].astype(bool))
    return blockwise_causal_attention(q, k, v, key_valid, block_size)


def blockwise_causal_attention(q, k, v, key_valid, block_size: int) -> jax.Array:
    """`causal_attention` in blocks of `block_size` tokens, whatever the lengths."""
    batch, queries = q.shape[:2]
    length = k.shape[1]

    def split(a):  # (B, T, ...) -> (blocks, B, block, ...), padded at the end (padding keys invalid)
        blocks = -(-a.shape[1] // block_size)
        a = jnp.pad(a, [(0, 0), (0, blocks * block_size - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(batch, blocks, block_size, *a.shape[2:]), 1, 0)

    def block_positions(first: int, count: int):  # (blocks, B, block_size) positions from `first` on
        blocks = -(-count // block_size)
        positions = first + jnp.arange(blocks * block_size).reshape(blocks, 1, block_size)
        return jnp.broadcast_to(positions, (blocks, batch, block_size))

    query_positions, key_positions = block_positions(length - queries, queries), block_positions(0, length)
    # Every query block reads every key block (causality masks the ones after it).
    index = jnp.broadcast_to(jnp.arange(key_positions.shape[0]), (query_positions.shape[0], key_positions.shape[0]))
    keys = split(k), split(v), index, split(key_valid.astype(bool))
    out = block_attention(split(q), *keys, positions=(query_positions, key_positions))  # (blocks, B, block, H * hd)
    return jnp.moveaxis(out, 0, 1).reshape(batch, -1, out.shape[-1])[:, :queries]


def block_attention(q, k, v, index, key_valid, segments=None, positions=None, branches=None, counts=None) -> jax.Array:
    """Grouped-query attention over key blocks chosen per query block; (nq, B, bq, H * hd) in v's dtype.

    q: (nq, B, bq, H, hd), nq query blocks of B rows each: the blocks run one after the
        other, the rows of a block together.
    k, v: (N, B, bk, Hkv, hd), each row's own key blocks, with index (nq, steps) int: the
        key block that query block i reads at step j (the decoder); or (N, bk, Hkv, hd), key
        blocks the rows share, with index (nq, steps, B): the key block that row b reads
        (vision: a frame's windows). Either way `k[index[i, j]]` is a step's (B, bk, Hkv, hd),
        and a row must not read a key block twice (its keys would count twice).
    key_valid: bool, k's leading axes: False for padding.
    segments: None, or (query (nq, B, bq), key: k's leading axes) int: a query attends to
        the keys of its own segment only.
    positions: None, or (query (nq, B, bq), key: k's leading axes) int: causal, a query
        attends to the keys at or before its position.
    branches: None, or (query (nq, B, bq), key: k's leading axes) int: sequences that share
        a prefix inside one segment (a prompt and its samples, packed.py): a key of branch 0
        (the prefix) is seen by every query of its segment, a key of any other branch by the
        queries of that branch only.
    counts: None, or (nq,) int: query block i reads only the first counts[i] key blocks of
        its index; the steps after are not run (packed sequences list the blocks a query block
        can see first, and each query block reads a different number of them).
    """
    num_kv = k.shape[-2]
    grouped = q.reshape(*q.shape[:3], num_kv, q.shape[3] // num_kv, q.shape[4])  # (nq, B, bq, Hkv, g, hd)
    out = _block_attention(grouped, k, v, _Where(index, key_valid, segments, positions, branches, counts))
    return out.reshape(*q.shape[:3], -1)


class _Where(NamedTuple):
    """Which key blocks each query block reads and which of their keys each query may see
    (`block_attention`'s arguments of the same names)."""

    index: jax.Array
    key_valid: jax.Array
    segments: tuple[jax.Array, jax.Array] | None
    positions: tuple[jax.Array, jax.Array] | None
    branches: tuple[jax.Array, jax.Array] | None
    counts: jax.Array | None


def _block_scores(q_block, k, key_index, query_ids, where: _Where):
    """Scaled fp32 scores of one query block (B, bq, Hkv, g, hd) against the keys `k[key_index]`,
    (B, Hkv, g, bq, bk), and which of them a query may attend to."""
    q_segments, q_positions, q_branches = query_ids
    key_side = lambda ids: ids[1][key_index][:, None, :]  # (B, 1, bk)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q_block, k[key_index]).astype(jnp.float32) * q_block.shape[-1] ** -0.5
    allowed = where.key_valid[key_index][:, None, :]
    if where.segments is not None:
        allowed = allowed & (q_segments[:, :, None] == key_side(where.segments))
    if where.positions is not None:
        allowed = allowed & (key_side(where.positions) <= q_positions[:, :, None])
    if where.branches is not None:
        key_branch = key_side(where.branches)
        allowed = allowed & ((key_branch == 0) | (key_branch == q_branches[:, :, None]))
    allowed = allowed[:, None, None]  # over the heads
    return jnp.where(allowed, scores, LOWEST), allowed


def _query_blocks(q, where: _Where):
    """What `lax.map` / `lax.scan` over the query blocks takes per block: the block, its key
    block indexes, its step count (or None) and its queries' segment ids, positions and
    branches (or None)."""
    query_side = lambda ids: None if ids is None else ids[0]
    query_ids = tuple(query_side(ids) for ids in (where.segments, where.positions, where.branches))
    return q, where.index, where.counts, query_ids


def _over_key_blocks(step, init, block_index, count):
    """`init` carried through `step(carry, key_index)` over a query block's key blocks: all of
    `block_index`, or its first `count` (a loop of that many steps: the rest cost nothing)."""
    if count is None:
        return jax.lax.scan(lambda carry, key_index: (step(carry, key_index), None), init, block_index)[0]
    return jax.lax.fori_loop(0, count, lambda i, carry: step(carry, block_index[i]), init)


def _tied(q, where):
    """q and the key blocks' flags, made to depend on each other (an optimization barrier).
    Under a layer scan the flags are loop-invariant: without this, the scan's partial
    evaluation hoists every step's gathered flags and masks out of the layer loop and stores
    them, (steps, B, H, bq, bk) booleans, the dense mask this module exists to avoid (the 7B
    vision tower cut to one window and one full-attention block, 980 x 980, remat full: 3.7
    GiB of gradient temporaries, 2.1 tied)."""
    return jax.lax.optimization_barrier((q, where))


@jax.custom_vjp
def _block_attention(q, k, v, where):
    return _forward(q, k, v, where)[0]


def _forward(q, k, v, where):
    """The online softmax: the output (nq, B, bq, Hkv, g, hd) and its log-sum-exp (nq, B, Hkv, g, bq)."""
    q, where = _tied(q, where)
    stats_shape = (q.shape[1], *q.shape[3:5], q.shape[2])  # (B, Hkv, g, bq)

    def query_block(inputs):
        q_block, block_index, count, query_ids = inputs

        def key_step(carry, key_index):
            running_max, running_sum, weighted = carry
            scores, allowed = _block_scores(q_block, k, key_index, query_ids, where)
            new_max = jnp.maximum(running_max, scores.max(-1))
            weights = jnp.where(allowed, jnp.exp(scores - new_max[..., None]), 0.0)
            rescale = jnp.exp(running_max - new_max)
            values = jnp.einsum("bkgqs,bskd->bkgqd", weights, v[key_index].astype(jnp.float32))
            return new_max, running_sum * rescale + weights.sum(-1), weighted * rescale[..., None] + values

        init = (
            jnp.full(stats_shape, LOWEST, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, q.shape[-1]), jnp.float32),
        )
        running_max, total, weighted = _over_key_blocks(key_step, init, block_index, count)
        total = jnp.maximum(total, TINY)  # no allowed key: zeros out, probabilities zero in the backward
        out = jnp.moveaxis(weighted / total[..., None], 3, 1).astype(v.dtype)  # (B, bq, Hkv, g, hd)
        return out, running_max + jnp.log(total)

    out, log_sum = jax.lax.map(query_block, _query_blocks(q, where))
    return out, (q, k, v, where, out, log_sum)


def _backward(residuals, d_out):
    """Flash attention's backward: per query block, per key block, the probabilities from the
    log-sum-exp, then dV += P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ += dS K, dK += dS^T Q."""
    q, k, v, where, out, log_sum = residuals
    q, where = _tied(q, where)
    d_out = d_out.astype(jnp.float32)
    # rowsum(dO * O), laid out like the log-sum-exp: (nq, B, Hkv, g, bq).
    d_sum = jnp.moveaxis((d_out * out.astype(jnp.float32)).sum(-1), 2, -1)
    scale = q.shape[-1] ** -0.5

    def query_block(d_keys, inputs):
        (q_block, block_index, count, query_ids), d_out_block, log_sum_block, d_sum_block = inputs

        def key_step(carry, key_index):
            d_q, d_k, d_v = carry
            scores, allowed = _block_scores(q_block, k, key_index, query_ids, where)
            probs = jnp.where(allowed, jnp.exp(scores - log_sum_block[..., None]), 0.0)
            d_v = d_v.at[key_index].add(jnp.einsum("bkgqs,bqkgd->bskd", probs, d_out_block))
            d_probs = jnp.einsum("bqkgd,bskd->bkgqs", d_out_block, v[key_index].astype(jnp.float32))
            d_scores = probs * (d_probs - d_sum_block[..., None]) * scale
            d_q = d_q + jnp.einsum("bkgqs,bskd->bqkgd", d_scores, k[key_index].astype(jnp.float32))
            d_k = d_k.at[key_index].add(jnp.einsum("bkgqs,bqkgd->bskd", d_scores, q_block.astype(jnp.float32)))
            return d_q, d_k, d_v

        init = (jnp.zeros(q_block.shape, jnp.float32), *d_keys)
        d_q, *d_keys = _over_key_blocks(key_step, init, block_index, count)
        return tuple(d_keys), d_q

    d_keys = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    inputs = (_query_blocks(q, where), d_out, log_sum, d_sum)
    (d_k, d_v), d_q = jax.lax.scan(query_block, d_keys, inputs)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_block_attention.defvjp(_forward, _backward)
