"""Per-token log-probabilities and entropy over a 152k vocabulary, chunked along the sequence.

    logp, entropy = token_logprobs_and_entropy(hidden, unembedding, tokens, temperature)

logits = h @ W / temperature, accumulated in fp32. With V = 152064 the full logits of a
2048-token response are 1.2 GB per sequence in fp32, so everything over the vocabulary is
computed in chunks of `chunk_size` tokens: peak memory O(B * chunk * V), not O(B * T * V),
in the forward pass and (each chunk's logits recomputed) in the backward pass. The loss,
the scoring pass, the dependency estimators (vppo_jax/vppo/dependency.py) and the warm
start all go through here.

The gradient of (log p(o_t), H_t) is written by hand (`_logp_entropy_backward`): it keeps
two numbers per token from the forward, recomputes the chunk's logits once, and forms the
logits' gradient in one pass over the vocabulary, where autodiff of a rematerialised
log-softmax recomputes the whole forward and then runs its backward op by op.
"""

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 128  # 128 x 152064 fp32 logits = 74 MiB per sequence and distribution


def log_softmax_chunk(hidden, unembedding, temperature):
    """fp32 log-probabilities over the vocabulary for a (B, c, D) chunk of hidden states.

    Pass hidden and unembedding in the same dtype: the matmul then accumulates in fp32
    (preferred_element_type) without materialising an fp32 copy of the (D, V) matrix.
    """
    return jax.nn.log_softmax(chunk_logits(hidden, unembedding, temperature), axis=-1)


def chunk_logits(hidden, unembedding, temperature):
    """h W / temperature for a (B, c, D) chunk, accumulated in fp32: (B, c, V)."""
    return jnp.einsum("bcd,dv->bcv", hidden, unembedding, preferred_element_type=jnp.float32) / temperature


def at_tokens(logp, tokens):
    """log p(o_t): (B, c, V), (B, c) -> (B, c)."""
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def map_token_chunks(chunk_fn, chunk_size, *per_token):
    """Apply chunk_fn to `chunk_size`-token slices of (B, T, ...) arrays, sequentially.

    T is padded up to a multiple of chunk_size (padded rows are zeros and are cut off
    again); lax.map runs the chunks one after another, so only one chunk's (B, c, V)
    intermediates are live. chunk_fn returns a pytree of (B, c) arrays; the result is
    the same pytree of (B, T) arrays. A chunk_fn to be differentiated must keep its
    backward at O(B * c * V) itself (a custom VJP, as `logp_and_entropy`, or jax.checkpoint).
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

    chunk_outputs = jax.lax.map(lambda xs: chunk_fn(*xs), tuple(to_chunks(x) for x in per_token))
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
    chunk_fn = lambda h, o: logp_and_entropy(h, unembedding, o, temperature)
    return map_token_chunks(chunk_fn, chunk_size, hidden, tokens)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def logp_and_entropy(hidden, unembedding, tokens, temperature):
    """(log p(o), H) of one (B, c, D) chunk: (B, c) each, fp32."""
    return _logp_entropy_forward(hidden, unembedding, tokens, temperature)[0]


def _logp_entropy_forward(hidden, unembedding, tokens, temperature):
    logits = chunk_logits(hidden, unembedding, temperature)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - log_normaliser[..., None])
    mean_logit = jnp.sum(probs * logits, axis=-1)  # E_p[z]; H = log Z - E_p[z]
    logp = at_tokens(logits, tokens) - log_normaliser
    return (logp, log_normaliser - mean_logit), (hidden, unembedding, tokens, log_normaliser, mean_logit)


def _logp_entropy_backward(temperature, residuals, cotangents):
    """d/dz of g_logp * log p(o) + g_H * H, with p = softmax(z): g_logp * (onehot(o) - p)
    - g_H * p * (z - E_p[z]); then through z = h W / temperature."""
    hidden, unembedding, tokens, log_normaliser, mean_logit = residuals
    g_logp, g_entropy = cotangents
    logits = chunk_logits(hidden, unembedding, temperature)
    probs = jnp.exp(logits - log_normaliser[..., None])
    g_logits = -probs * (g_logp[..., None] + g_entropy[..., None] * (logits - mean_logit[..., None]))
    g_logits = g_logits + jax.nn.one_hot(tokens, logits.shape[-1], dtype=g_logits.dtype) * g_logp[..., None]
    g_logits = (g_logits / temperature).astype(hidden.dtype)
    g_hidden = jnp.einsum("bcv,dv->bcd", g_logits, unembedding)
    flat = lambda a: a.reshape(-1, a.shape[-1])
    g_unembedding = jax.lax.dot_general(flat(hidden), flat(g_logits), (((0,), (0,)), ((), ())))
    return g_hidden, g_unembedding, None


logp_and_entropy.defvjp(_logp_entropy_forward, _logp_entropy_backward)
