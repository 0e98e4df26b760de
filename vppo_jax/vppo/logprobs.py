"""Per-token log-probabilities and entropy over a 152k vocabulary, chunked along the sequence.

    logp, entropy = token_logprobs_and_entropy(hidden, unembedding, tokens, temperature)

logits = h @ W / temperature, accumulated in fp32. With V = 152064 the full logits of a
2048-token response are 1.2 GB per sequence in fp32, so everything over the vocabulary is
computed in chunks of `chunk_size` tokens: peak memory O(B * chunk * V), not O(B * T * V),
in the forward pass and (each chunk's logits recomputed) in the backward pass. The loss,
the scoring pass, the dependency estimators (vppo_jax/vppo/dependency.py) and the warm
start all go through here.
"""

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 128  # 128 x 152064 fp32 logits = 74 MiB per sequence and distribution


def log_softmax_chunk(hidden, unembedding, temperature):
    """fp32 log-probabilities over the vocabulary for a (B, c, D) chunk of hidden states.

    Pass hidden and unembedding in the same dtype: the matmul then accumulates in fp32
    (preferred_element_type) without materialising an fp32 copy of the (D, V) matrix.
    """
    logits = jnp.einsum("bcd,dv->bcv", hidden, unembedding, preferred_element_type=jnp.float32)
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def at_tokens(logp, tokens):
    """log p(o_t): (B, c, V), (B, c) -> (B, c)."""
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def map_token_chunks(chunk_fn, chunk_size, *per_token):
    """Apply chunk_fn to `chunk_size`-token slices of (B, T, ...) arrays, sequentially.

    T is padded up to a multiple of chunk_size (padded rows are zeros and are cut off
    again); lax.map runs the chunks one after another, so only one chunk's (B, c, V)
    intermediates are live. chunk_fn returns a pytree of (B, c) arrays; the result is
    the same pytree of (B, T) arrays. jax.checkpoint makes reverse-mode autodiff save
    only each chunk's inputs and recompute its logits, keeping the backward pass at
    O(B * c * V) as well.
    """
    batch, length = per_token[0].shape[:2]
    num_chunks = -(-length // chunk_size)
    padded_length = num_chunks * chunk_size

    def to_chunks(x):
        pad = [(0, 0), (0, padded_length - length)] + [(0, 0)] * (x.ndim - 2)
        x = jnp.pad(x, pad).reshape(batch, num_chunks, chunk_size, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def from_chunks(y):
        return jnp.moveaxis(y, 0, 1).reshape(batch, padded_length)[:, :length]

    chunk_outputs = jax.lax.map(jax.checkpoint(lambda xs: chunk_fn(*xs)), tuple(to_chunks(x) for x in per_token))
    return jax.tree.map(from_chunks, chunk_outputs)


def token_logprobs_and_entropy(hidden, unembedding, tokens, temperature=1.0, chunk_size=DEFAULT_CHUNK_SIZE):
    """log pi(o_t | s_t) and the entropy H(pi(. | s_t)) per token, chunked over T.

    Args:
      hidden: (B, T, D) final hidden states at the positions predicting `tokens`.
      unembedding: (D, V) lm-head matrix.
      tokens: (B, T) int token ids.
    Returns:
      (logp, entropy), each (B, T) fp32; differentiable with respect to hidden and W.
    """

    def chunk_fn(h, o):
        logp = log_softmax_chunk(h, unembedding, temperature)
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return at_tokens(logp, o), entropy

    return map_token_chunks(chunk_fn, chunk_size, hidden, tokens)
