"""VPPO's two uses of token visual dependency S_t (paper Eqs. 5 and 6).

Trajectory-level Advantage Shaping (TAS, Eq. 5) scales each rollout's advantage by
alpha_i, larger for rollouts that depend more on the image on average:

    Sbar_i  = sum_t S_t m_t / max(|o_i|, 1)
    n_i     = clip((Sbar_i - min_j Sbar_j) / (max_j Sbar_j - min_j Sbar_j), 0, 1)
    alpha_i = beta_min + (beta_max - beta_min) n_i,        A'_i = alpha_i A_i

Token-level Gradient Filtering (TGF, Eq. 6) keeps the policy gradient of only the
top ceil(k |o_i|) tokens of each rollout by S_t (or by an ablation's score).
"""

import fractions

import jax
import jax.numpy as jnp

DEFAULT_BETA_MIN = 0.9
DEGENERATE_SPREAD = 1e-6  # reference code: no shaping when max - min <= 1e-6
DYNAMIC_EPS = 1e-8  # reference code: beta_max = beta_min + (1 - beta_min) / (mean(n) + 1e-8)
MAX_FRACTION_DENOMINATOR = 10_000


def trajectory_dependency(token_dependency, response_mask):
    """Sbar_i = sum_t S_t m_t / max(|o_i|, 1): mean dependency over response tokens (Eq. 5)."""
    mask = response_mask.astype(jnp.float32)
    length = jnp.maximum(mask.sum(axis=-1), 1.0)
    return (token_dependency * mask).sum(axis=-1) / length


def _by_scope(values, scope, group_size):
    """(R,) -> (scopes, members): one row per normalisation scope."""
    if scope == "global":
        return values.reshape(1, -1)
    if scope == "per_group":
        if group_size is None:
            raise ValueError("per_group TAS scope needs group_size")
        return values.reshape(-1, group_size)
    raise ValueError(f"unknown TAS scope {scope!r}; expected 'global' or 'per_group'")


def advantage_scale(
    trajectory_scores,
    trajectory_valid,
    mode="dynamic",
    beta_min=DEFAULT_BETA_MIN,
    beta_max=None,
    scope="global",
    group_size=None,
):
    """TAS scale alpha_i (paper Eq. 5).

    Args:
      trajectory_scores: (R,) Sbar_i from `trajectory_dependency`.
      trajectory_valid: (R,) bool; invalid rollouts (e.g. empty responses, filtered groups,
        batch padding) take no part in min/max/mean and get alpha = 1.
      mode: "dynamic" (reference code: beta_max = beta_min + (1 - beta_min) / (mean(n) +
        1e-8), mean over valid rollouts of the scope, so alpha averages to 1 there) or
        "static" (paper ablation, needs beta_max).
      scope: "global" (min/max/mean over the whole batch) or "per_group" (over each
        consecutive group of `group_size` rollouts).
    Returns:
      (R,) fp32 alpha. Within a scope with fewer than two valid rollouts or with
      max - min <= 1e-6, alpha = 1 (reference code).
    """
    if mode == "static" and beta_max is None:
        raise ValueError("static TAS needs beta_max")
    if mode not in ("static", "dynamic"):
        raise ValueError(f"unknown TAS mode {mode!r}; expected 'dynamic' or 'static'")
    scores = _by_scope(trajectory_scores.astype(jnp.float32), scope, group_size)
    valid = _by_scope(trajectory_valid.astype(bool), scope, group_size)

    count = valid.sum(axis=1, keepdims=True)
    low = jnp.min(jnp.where(valid, scores, jnp.inf), axis=1, keepdims=True)
    high = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=1, keepdims=True)
    degenerate = (count < 2) | (high - low <= DEGENERATE_SPREAD)
    # Degenerate scopes get alpha = 1 below; give them finite bounds so nothing is nan.
    low = jnp.where(degenerate, 0.0, low)
    spread = jnp.where(degenerate, 1.0, high - low)
    normalised = jnp.where(valid, jnp.clip((scores - low) / spread, 0.0, 1.0), 0.0)

    if mode == "dynamic":
        mean_normalised = normalised.sum(axis=1, keepdims=True) / jnp.maximum(count, 1)
        beta_max = beta_min + (1.0 - beta_min) / (mean_normalised + DYNAMIC_EPS)
    alpha = beta_min + (beta_max - beta_min) * normalised
    return jnp.where(degenerate | ~valid, 1.0, alpha).reshape(-1)


def selection_count(lengths, k):
    """ceil(k * |o_i|) in exact integer arithmetic.

    In floating point, k * |o| can land just above an integer and ceil bumps it up: in
    float32 (what the torch reference computes in) 0.3 * 50 = 15.000001, in float64
    0.28 * 25 = 7.000000000000001. Here k (a static config value) becomes the nearest
    fraction p/q with q <= 10000, exact for every k with up to four decimals, and
    ceil(|o| p / q) is computed on integers.
    """
    if not 0.0 <= k <= 1.0:
        raise ValueError(f"TGF fraction k must be in [0, 1], got {k}")
    ratio = fractions.Fraction(k).limit_denominator(MAX_FRACTION_DENOMINATOR)
    scaled = lengths.astype(jnp.int32) * ratio.numerator
    return -(-scaled // ratio.denominator)


def top_fraction_mask(scores, response_mask, k):
    """TGF mask (Eq. 6): 1 on the top ceil(k |o_i|) tokens of each row by score, else 0.

    Ranking is by descending score; ties go to the earlier position; padding ranks after
    every response token and is never selected.
    """
    valid = response_mask.astype(bool)
    positions = jnp.broadcast_to(jnp.arange(scores.shape[-1], dtype=jnp.int32), scores.shape)
    padding_last = (~valid).astype(jnp.int32)
    *_, order = jax.lax.sort((padding_last, -scores.astype(jnp.float32), positions), dimension=-1, num_keys=3)
    # order[r] is the position ranked r; sorting the pairs (order, r) by order inverts it.
    _, rank = jax.lax.sort((order, positions), dimension=-1, num_keys=1)
    count = selection_count(valid.sum(axis=-1), k)
    return ((rank < count[:, None]) & valid).astype(jnp.float32)


def soft_token_weights(token_dependency, response_mask):
    """Soft-mask ablation: weights proportional to S_t, scaled to S_t / max_t S_t per row.

    Dividing by the row maximum puts the weights in [0, 1] with the most dependent token
    at 1, i.e. on the same per-token scale as the hard 0/1 mask, so the loss denominator
    (all valid tokens) and learning rate keep their meaning; it leaves the comparison
    between rollouts to TAS. Negative scores (possible with top1_drop) count as 0; a row
    whose scores are all 0 gets no policy gradient.
    """
    mask = response_mask.astype(bool)
    positive = jnp.where(mask, jnp.maximum(token_dependency.astype(jnp.float32), 0.0), 0.0)
    row_max = positive.max(axis=-1, keepdims=True)
    return jnp.where(row_max > 0, positive / jnp.where(row_max > 0, row_max, 1.0), 0.0)


def token_filter(mode, response_mask, k, token_dependency=None, token_entropy=None, key=None):
    """TGF weights per token (paper Eq. 6) for `mode`:

      "dependency" top ceil(k |o|) by S_t (VPPO)
      "entropy"    top ceil(k |o|) by token entropy (ablation)
      "random"     ceil(k |o|) tokens uniformly at random, from `key` (ablation)
      "soft"       S_t / max_t S_t, ignores k (ablation)
    Returns (R, T) fp32 weights, 0 on padding.
    """
    if mode == "soft":
        return soft_token_weights(token_dependency, response_mask)
    if mode == "dependency":
        scores = token_dependency
    elif mode == "entropy":
        scores = token_entropy
    elif mode == "random":
        scores = jax.random.uniform(key, response_mask.shape)
    else:
        raise ValueError(f"unknown TGF mode {mode!r}")
    if scores is None:
        raise ValueError(f"TGF mode {mode!r} needs its score input")
    return top_fraction_mask(scores, response_mask, k)
