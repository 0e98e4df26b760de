"""Packed sequences: several sequences in one row of tokens (a *bin*), a prompt once with its samples.

    tree = token_tree(valid, segment_ids, branch_ids, block_size)   # host, NumPy: (K, N) bins
    out = tree_attention(q, k, v, tree, block_size)                 # the decoder's attention over them

Each token of a bin carries its sequence's segment id and a branch id: 0 for the sequence's
prompt, g + 1 for its g-th response. The responses follow the prompt one after another, so a
token attends to the keys before it (in packed order) of its own segment that are its
prompt's or its own response's: never across sequences, never to a sibling response. With
each response's rotary positions continuing from its prompt's (vppo_jax/vppo/packing.py sets
them), every token sees what it sees in its own unpadded row, and the decoder computes the
same hidden states.

Up to `block_size` tokens a bin runs the dense attention with its (N, N) mask; beyond,
attention.block_attention in blocks of `block_size`: each (bin, query block) reads the key
blocks holding a key one of its queries may see, found on the host (`token_tree`), and only
those (a count per query block). Blocks after the query block, of other sequences and of
sibling responses are never read, so a long bin costs what its sequences' own causal
attention costs, not N^2.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vppo_jax.models.qwen2_5_vl.attention import block_attention
from vppo_jax.models.qwen2_5_vl.layers import attention
from vppo_jax.parallel.sharding import per_device_attention


@flax.struct.dataclass
class TokenTree:
    """Who attends to whom in K bins of N packed tokens (see the module docstring)."""

    valid: jax.Array  # (K, N) bool: a token of some sequence (False: the bin's unused tail)
    segment_ids: jax.Array  # (K, N) int32: the token's sequence within its bin
    branch_ids: jax.Array  # (K, N) int32: 0 in the prompt, g + 1 in the sequence's g-th response
    # (K, nb, nb) int32, nb = ceil(N / block_size): the key blocks that query block i of bin k
    # may see, ascending, in its first counts[k, i] entries (the rest are never read).
    key_blocks: jax.Array
    counts: jax.Array  # (K, nb) int32


def token_tree(valid: np.ndarray, segment_ids: np.ndarray, branch_ids: np.ndarray, block_size: int) -> TokenTree:
    """The tree of K bins (K, N) with, for each query block of `block_size` tokens, the key
    blocks it may see: its own (if it holds a token), and each earlier block holding a key of
    one of its queries' segments in the prompt's branch or the query's own."""
    bins, length = valid.shape
    blocks = -(-length // block_size)
    key_blocks = np.zeros((bins, blocks, blocks), np.int32)
    counts = np.zeros((bins, blocks), np.int32)
    for b in range(bins):
        real = np.flatnonzero(valid[b])
        tags = [set() for _ in range(blocks)]  # (segment, branch) pairs in each block
        present = np.stack([real // block_size, segment_ids[b, real], branch_ids[b, real]], axis=1)
        for block, segment, branch in np.unique(present, axis=0).tolist():
            tags[block].add((segment, branch))
        for i, queries in enumerate(tags):
            seen = queries | {(segment, 0) for segment, _ in queries}
            visible = [j for j in range(i) if tags[j] & seen] + ([i] if queries else [])
            key_blocks[b, i, : len(visible)] = visible
            counts[b, i] = len(visible)
    return TokenTree(
        valid=np.asarray(valid, bool),
        segment_ids=np.asarray(segment_ids, np.int32),
        branch_ids=np.asarray(branch_ids, np.int32),
        key_blocks=key_blocks,
        counts=counts,
    )


def tree_mask(tree: TokenTree) -> jax.Array:
    """(K, N, N) bool: query i may attend to key j (the dense attention's mask)."""
    same_segment = tree.segment_ids[:, :, None] == tree.segment_ids[:, None, :]
    key_branch = tree.branch_ids[:, None, :]
    on_path = (key_branch == 0) | (key_branch == tree.branch_ids[:, :, None])
    length = tree.valid.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))  # in packed order
    return tree.valid[:, None, :] & same_segment & on_path & causal


def tree_attention(q: jax.Array, k: jax.Array, v: jax.Array, tree: TokenTree, block_size: int) -> jax.Array:
    """Attention of K bins' packed tokens over `tree`; q (K, N, H, hd), k and v (K, N, Hkv, hd);
    returns (K, N, H * hd) in v's dtype. Queries of the unused tail come out finite, unread.
    Under a mesh the blockwise kernel runs on each device's bins (`per_device_attention`)."""
    bins, length, heads, head_dim = q.shape
    if length <= block_size:
        return attention(q, k, v, tree_mask(tree))
    if tree.counts.shape[1] != -(-length // block_size):
        raise ValueError(f"the token tree has {tree.counts.shape[1]} blocks per bin, not those of {block_size}.")
    run = functools.partial(_blockwise_tree_attention, block_size=block_size)
    return per_device_attention(run, q, k, v, tree).reshape(bins, length, heads * head_dim)


def _blockwise_tree_attention(q, k, v, tree: TokenTree, block_size: int) -> jax.Array:
    """`tree_attention` with block_attention, (K, N, H, hd): one query block per (bin, block),
    each its own row (B = 1), so that each reads its own key blocks, as many as it may see."""
    bins, length = q.shape[:2]
    blocks = tree.counts.shape[1]

    def split(a):  # (K, N, ...) -> (K * nb, block, ...), the tail padded (invalid, never a query's key)
        a = jnp.pad(a, [(0, 0), (0, blocks * block_size - length)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(bins * blocks, block_size, *a.shape[2:])

    per_token = lambda a: (split(a)[:, None], split(a))
    order = jnp.broadcast_to(jnp.arange(length), (bins, length))  # causal order: packed position
    index = tree.key_blocks + blocks * jnp.arange(bins)[:, None, None]  # into this device's bins' blocks
    out = block_attention(
        split(q)[:, None],
        split(k),
        split(v),
        index.reshape(bins * blocks, blocks, 1),
        split(tree.valid),
        segments=per_token(tree.segment_ids),
        positions=per_token(order),
        branches=per_token(tree.branch_ids),
        counts=tree.counts.reshape(-1),
    )
    return out.reshape(bins, blocks * block_size, *q.shape[2:])[:, :length]
