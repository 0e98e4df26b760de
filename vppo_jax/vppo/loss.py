"""The VPPO policy loss: DAPO-style clipped GRPO with TAS and TGF (paper Eqs. 5-6).

Per response token, with rho = exp(clip(logp - logp_old, -20, 20)) and the shaped
advantage A' = alpha_i A_i of its rollout:

    l_t = max(-A' rho, -A' clip(rho, 1 - eps_low, 1 + eps_high))   clip-higher (DAPO)
    l_t = min(l_t, -A' c)                               if A' < 0   dual-clip (c = 3)

The policy term is sum_t w_t l_t with w the TGF mask (or soft weights), divided by ALL
valid response tokens of the global batch (reference code), or the paper's per-sequence
mean (Eq. 6). To that the reference adds 0.06 * mean over all valid tokens of
(-logp(o_t)), an "entropy penalty" that pushes entropy down, and optionally a k3 KL to a
reference policy.

Gradient accumulation: every term is returned as a sum, and its denominator comes from
the masks alone (`loss_counts`), so the train step can count the global batch first and
divide each micro-batch's sums by the global counts; the accumulated gradient is then
exactly that of the global token mean.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vppo_jax.vppo.dependency import LOG_RATIO_CLIP, k3_divergence


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss hyper-parameters (the reference recipe's); frozen so it can be a static jit argument.

    aggregation: "token" divides the policy (and KL) sums by all valid response tokens
      (reference code); "sequence" averages each response over its |o_i| tokens, then
      averages over non-empty responses (paper Eq. 6).
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0
    entropy_coef: float = 0.06
    kl_coef: float = 0.0
    aggregation: str = "token"


class LossSums(NamedTuple):
    policy: jax.Array  # sum of w_t l_t (per-sequence normalised under "sequence")
    entropy: jax.Array  # sum of -logp(o_t) over valid tokens
    kl: jax.Array  # sum of k3(pi_theta, pi_ref), aggregated like `policy`; 0 without ref


class LossCounts(NamedTuple):
    policy: jax.Array  # denominator of `policy` and `kl`: tokens, or non-empty sequences
    tokens: jax.Array  # valid response tokens: denominator of `entropy` and the metrics


def loss_counts(response_mask, aggregation="token"):
    """Denominators from the response mask alone; sum them over micro-batches / devices."""
    mask = response_mask.astype(jnp.float32)
    tokens = mask.sum()
    if aggregation == "token":
        return LossCounts(policy=tokens, tokens=tokens)
    if aggregation == "sequence":
        return LossCounts(policy=(mask.sum(axis=-1) > 0).sum().astype(jnp.float32), tokens=tokens)
    raise ValueError(f"unknown aggregation {aggregation!r}; expected 'token' or 'sequence'")


def _aggregate(per_token, weights, mask, aggregation):
    """Sum of weights * per_token; under "sequence" each row is divided by its |o_i|.

    The per-sequence denominator is the response length, not the number of selected
    tokens: unselected tokens contribute zero to the mean, as in Eq. 6.
    """
    weighted = (per_token * weights).sum(axis=-1)
    if aggregation == "sequence":
        weighted = weighted / jnp.maximum(mask.sum(axis=-1), 1.0)
    return weighted.sum()


def clipped_token_loss(logp, old_logp, shaped_advantages, config):
    """Per-token clip-higher + dual-clip loss l_t and which clip was active (DAPO's clip-higher, dual-clip).

    Args:
      logp, old_logp: (B, T) log-probs of the sampled tokens under pi_theta and pi_old.
      shaped_advantages: (B, 1) or (B, T) advantages A' (already scaled by alpha).
    Returns:
      (loss (B, T), ratio (B, T), dict of (B, T) bool clip indicators).
    """
    ratio = jnp.exp(jnp.clip(logp - old_logp, -LOG_RATIO_CLIP, LOG_RATIO_CLIP))
    unclipped = -shaped_advantages * ratio
    clipped = -shaped_advantages * jnp.clip(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high)
    pessimistic = jnp.maximum(unclipped, clipped)
    dual_bound = -shaped_advantages * config.dual_clip
    negative = shaped_advantages < 0
    loss = jnp.where(negative, jnp.minimum(pessimistic, dual_bound), pessimistic)
    clip_active = unclipped < clipped  # the trust-region bound took over (zero gradient)
    indicators = {
        "clipfrac_high": clip_active & ~negative,  # A' > 0 and rho > 1 + eps_high
        "clipfrac_low": clip_active & negative,  # A' < 0 and rho < 1 - eps_low
        "clipfrac_dual": (pessimistic > dual_bound) & negative,  # A' < 0 and rho > c
    }
    return loss, ratio, indicators


def loss_sums(
    logp, old_logp, advantages, response_mask, alpha=None, token_weights=None, ref_logp=None, config=LossConfig()
):
    """The loss terms of one (micro-)batch as sums, plus metric sums over valid tokens.

    Args:
      logp: (B, T) log pi_theta(o_t), differentiable.
      old_logp: (B, T) log pi_old(o_t) from the rollout policy.
      advantages: (B,) GRPO advantages A_i.
      response_mask: (B, T) valid response tokens.
      alpha: (B,) TAS scale (None: 1, plain GRPO).
      token_weights: (B, T) TGF 0/1 mask or soft weights (None: every valid token).
      ref_logp: (B, T) log pi_ref(o_t) for the optional KL term (None: no KL).
    Returns:
      (LossSums, dict of metric sums; divide them by LossCounts.tokens).
    """
    mask = response_mask.astype(jnp.float32)
    shaped = advantages.astype(jnp.float32)
    if alpha is not None:
        shaped = alpha * shaped
    weights = mask if token_weights is None else jax.lax.stop_gradient(token_weights) * mask

    token_loss, ratio, indicators = clipped_token_loss(logp, old_logp, shaped[:, None], config)
    policy = _aggregate(token_loss, weights, mask, config.aggregation)
    entropy = (-logp * mask).sum()
    if ref_logp is None:
        kl = jnp.zeros((), jnp.float32)
    else:
        kl = _aggregate(k3_divergence(logp, ref_logp), mask, mask, config.aggregation)

    metric_sums = {name: (active * mask).sum() for name, active in indicators.items()}
    metric_sums["ratio"] = (ratio * mask).sum()
    metric_sums["ppo_kl"] = ((old_logp - logp) * mask).sum()
    metric_sums["selected_weight"] = weights.sum()
    return LossSums(policy=policy, entropy=entropy, kl=kl), jax.lax.stop_gradient(metric_sums)


def total_loss(sums, counts, config=LossConfig()):
    """policy/count + entropy_coef * entropy/tokens + kl_coef * kl/count (the reference's loss).

    With `counts` of the global batch, this is linear in the sums, so gradients of
    micro-batches add up to the gradient of the global loss.
    """
    policy_count = jnp.maximum(counts.policy, 1.0)
    return (
        sums.policy / policy_count
        + config.entropy_coef * sums.entropy / jnp.maximum(counts.tokens, 1.0)
        + config.kl_coef * sums.kl / policy_count
    )


def policy_loss(
    logp, old_logp, advantages, response_mask, alpha=None, token_weights=None, ref_logp=None, config=LossConfig()
):
    """The loss of one whole batch (no accumulation) and its metrics as means.

    Returns (scalar loss, dict: clip fractions, mean ratio, ppo_kl, selected_weight per
    valid token, and the three loss terms pg_loss, entropy_loss, kl_loss).
    """
    sums, metric_sums = loss_sums(logp, old_logp, advantages, response_mask, alpha, token_weights, ref_logp, config)
    counts = loss_counts(response_mask, config.aggregation)
    tokens = jnp.maximum(counts.tokens, 1.0)
    metrics = {name: value / tokens for name, value in metric_sums.items()}
    metrics["pg_loss"] = sums.policy / jnp.maximum(counts.policy, 1.0)
    metrics["entropy_loss"] = sums.entropy / tokens
    metrics["kl_loss"] = sums.kl / jnp.maximum(counts.policy, 1.0)
    return total_loss(sums, counts, config), jax.lax.stop_gradient(metrics)
