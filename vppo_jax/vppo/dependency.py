"""Token visual dependency S(s_t, I) (paper Definition 3.1, Eq. 3).

    S(s_t, I) = KL( pi(. | s_t, I) || pi(. | s_t, I') ),   s_t = (q, o_<t)

The inputs are the policy's final hidden states with the original image, h (B, T, D),
and with the perturbed image, h' (B, T, D), plus the unembedding W (D, V):
logits = h @ W / temperature, accumulated in fp32. With V = 152064 the full logits of a
2048-token response are 1.2 GB per sequence in fp32, so everything over the vocabulary is
computed in chunks of `chunk_size` tokens: peak memory O(B * chunk * V), not O(B * T * V).

Estimators:
  k3        one-sample estimate on the sampled token (reference code default)
  kl        exact KL over the vocabulary (the paper's definition)
  jsd       Jensen-Shannon divergence, natural log (paper ablation)
  top1_drop p(top-1 token of p) - p'(that token) (paper ablation; signed)
Masked positions give 0.

`token_logprobs_and_entropy` uses the same chunking for the loss; it is differentiable in
h and W, and its backward pass recomputes each chunk's logits instead of storing them.
"""
import functools

import jax
import jax.numpy as jnp

LOG_RATIO_CLIP = 20.0  # clip on log-ratios before exp (reference code), avoids inf/nan
K3_MAX = 10.0  # clip on the k3 value (reference code)
DEFAULT_CHUNK_SIZE = 128  # 128 x 152064 fp32 logits = 74 MiB per sequence and distribution


def k3_divergence(logp, logq):
    """Per-token k3 estimate of KL(p || q) on a token sampled from p (paper Definition 3.1).

    d = clip(log q(o) - log p(o), -20, 20);  k3 = clip(exp(d) - d - 1, 0, 10).
    Since E_p[q/p] = 1 and E_p[-d] = KL(p || q), it is unbiased before clipping.
    """
    d = jnp.clip(logq - logp, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    return jnp.clip(jnp.exp(d) - d - 1.0, 0.0, K3_MAX)


def _log_softmax_of(hidden, unembedding, temperature):
    """fp32 log-probabilities over the vocabulary for a (B, c, D) chunk of hidden states.

    Pass hidden and unembedding in the same dtype: the matmul then accumulates in fp32
    (preferred_element_type) without materialising an fp32 copy of the (D, V) matrix.
    """
    logits = jnp.einsum("bcd,dv->bcv", hidden, unembedding, preferred_element_type=jnp.float32)
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def _at_tokens(logp, tokens):
    """log p(o_t): (B, c, V), (B, c) -> (B, c)."""
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def _map_token_chunks(chunk_fn, chunk_size, *per_token):
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

    chunk_outputs = jax.lax.map(jax.checkpoint(lambda xs: chunk_fn(*xs)),
                                tuple(to_chunks(x) for x in per_token))
    return jax.tree.map(from_chunks, chunk_outputs)


def token_logprobs_and_entropy(hidden, unembedding, tokens, temperature=1.0,
                               chunk_size=DEFAULT_CHUNK_SIZE):
    """log pi(o_t | s_t) and the entropy H(pi(. | s_t)) per token, chunked over T.

    Args:
      hidden: (B, T, D) final hidden states at the positions predicting `tokens`.
      unembedding: (D, V) lm-head matrix.
      tokens: (B, T) int token ids.
    Returns:
      (logp, entropy), each (B, T) fp32; differentiable with respect to hidden and W.
    """
    def chunk_fn(h, o):
        logp = _log_softmax_of(h, unembedding, temperature)
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return _at_tokens(logp, o), entropy

    return _map_token_chunks(chunk_fn, chunk_size, hidden, tokens)


def _sampled_k3(logp, logp_perturbed, tokens):
    return k3_divergence(_at_tokens(logp, tokens), _at_tokens(logp_perturbed, tokens))


def _exact_kl(logp, logp_perturbed, tokens):
    del tokens
    return jnp.sum(jnp.exp(logp) * (logp - logp_perturbed), axis=-1)


def _jensen_shannon(logp, logp_perturbed, tokens):
    """JSD = KL(p || m)/2 + KL(p' || m)/2 with m = (p + p')/2, natural log."""
    del tokens
    log_m = jnp.logaddexp(logp, logp_perturbed) - jnp.log(2.0)
    kl_p = jnp.sum(jnp.exp(logp) * (logp - log_m), axis=-1)
    kl_q = jnp.sum(jnp.exp(logp_perturbed) * (logp_perturbed - log_m), axis=-1)
    return 0.5 * (kl_p + kl_q)


def _top1_probability_drop(logp, logp_perturbed, tokens):
    del tokens
    top1 = jnp.argmax(logp, axis=-1)
    return jnp.exp(_at_tokens(logp, top1)) - jnp.exp(_at_tokens(logp_perturbed, top1))


ESTIMATORS = {"k3": _sampled_k3, "kl": _exact_kl, "jsd": _jensen_shannon,
              "top1_drop": _top1_probability_drop}


def token_dependency(name, hidden, hidden_perturbed, unembedding, tokens, mask,
                     temperature=1.0, chunk_size=DEFAULT_CHUNK_SIZE):
    """Per-token visual dependency S_t (paper Definition 3.1) with estimator `name`.

    Args:
      name: one of "k3", "kl", "jsd", "top1_drop" (static).
      hidden, hidden_perturbed: (B, T, D) final hidden states with I and with I'.
      unembedding: (D, V).
      tokens: (B, T) sampled tokens o_t (used by k3).
      mask: (B, T) response mask; masked positions give 0.
      temperature: rollout temperature (1.0).
      chunk_size: tokens per vocabulary chunk (static).
    Returns:
      (B, T) fp32 dependency scores, without gradient (they come from pi_old).
    """
    estimator = ESTIMATORS[name]

    def chunk_fn(h, h_perturbed, o):
        return estimator(_log_softmax_of(h, unembedding, temperature),
                         _log_softmax_of(h_perturbed, unembedding, temperature), o)

    scores = _map_token_chunks(chunk_fn, chunk_size, hidden, hidden_perturbed, tokens)
    return jax.lax.stop_gradient(jnp.where(mask.astype(bool), scores, 0.0))


# The estimators by name, e.g. kl(hidden, hidden_perturbed, unembedding, tokens, mask).
k3 = functools.partial(token_dependency, "k3")
kl = functools.partial(token_dependency, "kl")
jsd = functools.partial(token_dependency, "jsd")
top1_drop = functools.partial(token_dependency, "top1_drop")
