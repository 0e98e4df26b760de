"""Token visual dependency S(s_t, I) (paper Definition 3.1, Eq. 3).

    S(s_t, I) = KL( pi(. | s_t, I) || pi(. | s_t, I') ),   s_t = (q, o_<t)

The inputs are the policy's final hidden states with the original image, h (B, T, D),
and with the perturbed image, h' (B, T, D), plus the unembedding W (D, V); both
distributions are computed chunk by chunk over the sequence (vppo_jax/vppo/logprobs.py).

Estimators:
  k3        one-sample estimate on the sampled token (reference code default)
  kl        exact KL over the vocabulary (the paper's definition)
  jsd       Jensen-Shannon divergence, natural log (paper ablation)
  top1_drop p(top-1 token of p) - p'(that token) (paper ablation; signed)
Masked positions give 0.
"""

import functools

import jax
import jax.numpy as jnp

from vppo_jax.vppo.logprobs import DEFAULT_CHUNK_SIZE, at_tokens, log_softmax_chunk, map_token_chunks

LOG_RATIO_CLIP = 20.0  # clip on log-ratios before exp (reference code), avoids inf/nan
K3_MAX = 10.0  # clip on the k3 value (reference code)


def k3_divergence(logp, logq, floor=0.0):
    """Per-token k3 estimate of KL(p || q) on a token sampled from p (paper Definition 3.1).

    d = clip(log q(o) - log p(o), -20, 20);  k3 = clip(exp(d) - d - 1, floor, 10).
    Since E_p[q/p] = 1 and E_p[-d] = KL(p || q), it is unbiased before clipping. The value is
    never negative, but in float32 it can round below 0 for d near 0: a floor of 0 (the
    reference's, for the dependency) gives it no gradient there; verl's KL loss floors at -10.
    """
    d = jnp.clip(logq - logp, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    return jnp.clip(jnp.exp(d) - d - 1.0, floor, K3_MAX)


def _sampled_k3(logp, logp_perturbed, tokens):
    return k3_divergence(at_tokens(logp, tokens), at_tokens(logp_perturbed, tokens))


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
    return jnp.exp(at_tokens(logp, top1)) - jnp.exp(at_tokens(logp_perturbed, top1))


ESTIMATORS = {"k3": _sampled_k3, "kl": _exact_kl, "jsd": _jensen_shannon, "top1_drop": _top1_probability_drop}


def scores_with_dependency(
    name, hidden, hidden_perturbed, unembedding, tokens, mask, temperature=1.0, chunk_size=DEFAULT_CHUNK_SIZE
):
    """log pi(o_t | s_t, I), the entropy H_t and the visual dependency S(s_t, I) (paper
    Definition 3.1) of every token, with estimator `name`, each distribution over the
    vocabulary computed once: what the scoring pass needs of pi_old.

    Args:
      name: one of "k3", "kl", "jsd", "top1_drop" (static).
      hidden, hidden_perturbed: (B, T, D) final hidden states with I and with I'.
      unembedding: (D, V).
      tokens: (B, T) sampled tokens o_t.
      mask: (B, T) response mask; masked positions get dependency 0.
      temperature: rollout temperature (1.0).
      chunk_size: tokens per vocabulary chunk (static).
    Returns:
      (logp, entropy, dependency), each (B, T) fp32, without gradient (they are pi_old's).
    """
    estimator = ESTIMATORS[name]

    def chunk_fn(h, h_perturbed, o):
        logp = log_softmax_chunk(h, unembedding, temperature)
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return at_tokens(logp, o), entropy, estimator(logp, log_softmax_chunk(h_perturbed, unembedding, temperature), o)

    logp, entropy, scores = map_token_chunks(chunk_fn, chunk_size, hidden, hidden_perturbed, tokens)
    return jax.lax.stop_gradient((logp, entropy, jnp.where(mask.astype(bool), scores, 0.0)))


def token_dependency(
    name, hidden, hidden_perturbed, unembedding, tokens, mask, temperature=1.0, chunk_size=DEFAULT_CHUNK_SIZE
):
    """The dependency alone, (B, T) fp32 (see `scores_with_dependency`; the compiler drops the
    unused log-probs and entropy)."""
    args = (hidden, hidden_perturbed, unembedding, tokens, mask, temperature, chunk_size)
    return scores_with_dependency(name, *args)[2]


# The estimators by name, e.g. kl(hidden, hidden_perturbed, unembedding, tokens, mask).
k3 = functools.partial(token_dependency, "k3")
kl = functools.partial(token_dependency, "kl")
jsd = functools.partial(token_dependency, "jsd")
top1_drop = functools.partial(token_dependency, "top1_drop")
