"""The VPPO policy loss: DAPO-style clipped GRPO with TAS and TGF (paper Eqs. 5-6), and
the policy losses researchers swap in for it (docs/algorithm.md#policy-losses).

Per response token, with rho = exp(clip(logp - logp_old, -20, 20)) and the shaped
advantage A' = alpha_i A_i of its rollout, the default ("ppo_clip"):

    l_t = max(-A' rho, -A' clip(rho, 1 - eps_low, 1 + eps_high))   clip-higher (DAPO)
    l_t = min(l_t, -A' c)                               if A' < 0   dual-clip (c = 3)

"gspo" and "gspo_token" put GSPO's sequence-level ratio s_i = exp(mean_t (logp - logp_old))
in place of rho (no dual clip); "cispo" is MiniMax-M1's -sg(clip(rho)) A' logp.

The policy term is sum_t w_t l_t with w the TGF mask (or soft weights), divided by ALL
valid response tokens of the global batch (reference code), the paper's per-sequence
mean (Eq. 6), or Dr.GRPO's constant. To that the reference adds 0.06 * mean over all valid
tokens of (-logp(o_t)), an "entropy penalty" that pushes entropy down, and optionally a KL
estimate to a reference policy (k1, k2 or k3).

Gradient accumulation: every term is returned as a sum, and its denominator comes from
the masks alone (`loss_counts`), so the train step can count the global batch first and
divide each micro-batch's sums by the global counts; the accumulated gradient is then
exactly that of the global token mean.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vppo_jax.vppo.dependency import K3_MAX, LOG_RATIO_CLIP, k3_divergence

POLICY_LOSSES = ("ppo_clip", "gspo", "gspo_token", "cispo")
AGGREGATIONS = ("token", "sequence", "constant")
KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp, ref_logp, estimator):
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi (Schulman's k1, k2, k3):
    k1 = log pi/pi_ref, k2 = (log pi/pi_ref)^2 / 2, k3 = pi_ref/pi - log(pi_ref/pi) - 1 (verl's
    "low_var_kl", EasyR1's default) with verl's clamps: the log-ratio to +-20, the value to +-10
    (so that near pi_ref, where float32 rounds it below 0, it keeps its gradient)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return k3_divergence(logp, ref_logp, floor=-K3_MAX)
    raise ValueError(f"kl_estimator={estimator!r}; choose one of {KL_ESTIMATORS}.")


def sequence_kl(logp, ref_logp, response_mask, estimator):
    """Each response's KL estimate summed over its tokens: the PPO-style reward penalty's
    (verl's apply_kl_penalty, with outcome rewards summed over the response)."""
    return (kl_estimate(logp, ref_logp, estimator) * response_mask).sum(axis=-1)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss hyper-parameters (the reference recipe's); frozen so it can be a static jit argument.

    policy_loss: "ppo_clip" (the reference's clipped token ratio), "gspo" / "gspo_token"
      (GSPO's sequence-level ratio, the clip range from clip_low / clip_high), "cispo"
      (MiniMax-M1's clipped, stop-gradient IS weight on A' logp).
    aggregation: "token" divides the policy (and KL) sums by all valid response tokens
      (reference code); "sequence" averages each response over its |o_i| tokens, then
      averages over non-empty responses (paper Eq. 6); "constant" divides by rows x the
      response window, a constant (Dr.GRPO; verl's "seq-mean-token-sum-norm").
    kl_coef, kl_estimator: the KL-to-reference loss term (GRPO style); kl_estimator also
      estimates the reward penalty of StepConfig.kl_penalty_coef.
    """

    policy_loss: str = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0  # ppo_clip only
    entropy_coef: float = 0.06
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    aggregation: str = "token"

    def __post_init__(self):
        choices = {"policy_loss": POLICY_LOSSES, "aggregation": AGGREGATIONS, "kl_estimator": KL_ESTIMATORS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {allowed}.")


class LossSums(NamedTuple):
    policy: jax.Array  # sum of w_t l_t (per-sequence normalised under "sequence")
    entropy: jax.Array  # sum of -logp(o_t) over valid tokens
    kl: jax.Array  # sum of the KL estimate to pi_ref, aggregated like `policy`; 0 without ref


class LossCounts(NamedTuple):
    policy: jax.Array  # denominator of `policy` and `kl`: tokens, non-empty sequences, or rows x window
    tokens: jax.Array  # valid response tokens: denominator of `entropy` and the metrics


def loss_counts(response_mask, aggregation="token", rows=None):
    """Denominators from the response mask alone (of `rows` rows under "constant", default all
    of the mask's: a packed batch has more); sum them over micro-batches / devices."""
    mask = response_mask.astype(jnp.float32)
    tokens = mask.sum()
    if aggregation == "token":
        return LossCounts(policy=tokens, tokens=tokens)
    if aggregation == "sequence":
        return LossCounts(policy=(mask.sum(axis=-1) > 0).sum().astype(jnp.float32), tokens=tokens)
    if aggregation == "constant":
        # Dr.GRPO: every row counts as the response window's width (rollout.max_new_tokens in
        # the trainer), so no response's tokens weigh more for being in a short response.
        size = mask.size if rows is None else rows * mask.shape[-1]
        return LossCounts(policy=jnp.float32(size), tokens=tokens)
    raise ValueError(f"aggregation={aggregation!r}; choose one of {AGGREGATIONS}.")


def _aggregate(per_token, weights, mask, aggregation):
    """Sum of weights * per_token; under "sequence" each row is divided by its |o_i|.

    The per-sequence denominator is the response length, not the number of selected
    tokens: unselected tokens contribute zero to the mean, as in Eq. 6.
    """
    weighted = (per_token * weights).sum(axis=-1)
    if aggregation == "sequence":
        weighted = weighted / jnp.maximum(mask.sum(axis=-1), 1.0)
    return weighted.sum()


def importance_ratio(logp, old_logp, mask, policy_loss):
    """The ratio each token's loss uses: rho_t = pi/pi_old per token, or GSPO's s_i =
    exp(mean_t log(pi/pi_old)) over the response's valid tokens, its gradient reaching every
    token ("gspo"), or s_{i,t} = sg[s_i] pi/sg[pi], s_i in value with each token's own gradient
    ("gspo_token"). Log-ratios are clipped to +-20 before exp (reference code)."""
    log_ratio = logp - old_logp
    if policy_loss in ("gspo", "gspo_token"):
        length = jnp.maximum(mask.sum(axis=-1, keepdims=True), 1.0)
        sequence = (log_ratio * mask).sum(axis=-1, keepdims=True) / length
        if policy_loss == "gspo":
            log_ratio = jnp.broadcast_to(sequence, logp.shape)
        else:
            log_ratio = jax.lax.stop_gradient(sequence) + logp - jax.lax.stop_gradient(logp)
    return jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLIP, LOG_RATIO_CLIP))


def token_loss(logp, old_logp, shaped_advantages, mask, config):
    """Per-token loss l_t of `config.policy_loss` and which clip was active.

    Args:
      logp, old_logp: (B, T) log-probs of the sampled tokens under pi_theta and pi_old.
      shaped_advantages: (B, 1) advantages A' (already scaled by alpha).
      mask: (B, T) fp32 valid response tokens (GSPO's mean runs over them).
    Returns:
      (loss (B, T), ratio (B, T), dict of (B, T) bool clip indicators).
    """
    ratio = importance_ratio(logp, old_logp, mask, config.policy_loss)
    low, high = 1.0 - config.clip_low, 1.0 + config.clip_high
    indicators = {"clipfrac_dual": jnp.zeros_like(ratio, bool)}  # only the PPO loss has a dual clip
    if config.policy_loss == "cispo":
        # The clipped IS weight is a constant: every token keeps its gradient, scaled by it.
        weight = jax.lax.stop_gradient(jnp.clip(ratio, low, high))
        indicators |= {"clipfrac_high": ratio > high, "clipfrac_low": ratio < low}
        return -weight * shaped_advantages * logp, ratio, indicators
    unclipped = -shaped_advantages * ratio
    clipped = -shaped_advantages * jnp.clip(ratio, low, high)
    pessimistic = jnp.maximum(unclipped, clipped)
    negative = shaped_advantages < 0
    clip_active = unclipped < clipped  # the trust-region bound took over (zero gradient)
    indicators |= {
        "clipfrac_high": clip_active & ~negative,  # A' > 0 and ratio > 1 + eps_high
        "clipfrac_low": clip_active & negative,  # A' < 0 and ratio < 1 - eps_low
    }
    if config.policy_loss != "ppo_clip":  # GSPO defines no dual clip
        return pessimistic, ratio, indicators
    dual_bound = -shaped_advantages * config.dual_clip
    loss = jnp.where(negative, jnp.minimum(pessimistic, dual_bound), pessimistic)
    indicators["clipfrac_dual"] = (pessimistic > dual_bound) & negative  # A' < 0 and rho > c
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
      ref_logp: (B, T) log pi_ref(o_t) for the KL term (None: no KL).
    Returns:
      (LossSums, dict of metric sums; divide them by LossCounts.tokens).
    """
    mask = response_mask.astype(jnp.float32)
    shaped = advantages.astype(jnp.float32)
    if alpha is not None:
        shaped = alpha * shaped
    weights = mask if token_weights is None else jax.lax.stop_gradient(token_weights) * mask

    losses, ratio, indicators = token_loss(logp, old_logp, shaped[:, None], mask, config)
    policy = _aggregate(losses, weights, mask, config.aggregation)
    entropy = (-logp * mask).sum()
    if ref_logp is None:
        kl = jnp.zeros((), jnp.float32)
    else:  # a regulariser on every valid token: TGF's weights do not apply
        kl = _aggregate(kl_estimate(logp, ref_logp, config.kl_estimator), mask, mask, config.aggregation)

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
