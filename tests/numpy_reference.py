"""NumPy versions of the paper's formulas that several tests compare against."""

import numpy as np


def numpy_grpo_advantages(rewards, group_size: int) -> np.ndarray:
    """GRPO advantages in float64: (r - mean) / (std with Bessel's correction + 1e-6) per group."""
    grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)
    centred = grouped - grouped.mean(1, keepdims=True)
    return (centred / (grouped.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)


# --- Advantage estimators, from their papers' (and verl's) equations ---------------------------


def numpy_dr_grpo_advantages(rewards, group_size: int) -> np.ndarray:
    """Dr.GRPO (Liu et al. 2025, Eq. 3): r_i - mean of the group, no division by its std."""
    grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)
    return (grouped - grouped.mean(1, keepdims=True)).reshape(-1)


def numpy_rloo_advantages(rewards, group_size: int) -> np.ndarray:
    """RLOO (Ahmadian et al. 2024): r_i minus the mean of the group's other rewards, literally."""
    grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)
    out = np.empty_like(grouped)
    for g, row in enumerate(grouped):
        for i in range(group_size):
            out[g, i] = row[i] - np.delete(row, i).mean()
    return out.reshape(-1)


def numpy_reinforce_pp_baseline_advantages(rewards, group_size: int, lengths) -> np.ndarray:
    """verl's reinforce_plus_plus_baseline: the group mean subtracted, the score put on every
    response token, then masked_whiten over the tokens (unbiased variance, 1e-8 inside the rsqrt)."""
    grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)
    scores = (grouped - grouped.mean(1, keepdims=True)).reshape(-1)
    width = max(int(max(lengths)), 1)
    mask = np.arange(width)[None] < np.asarray(lengths)[:, None]
    tokens = np.repeat(scores[:, None], width, 1)[mask]
    whitened = (tokens - tokens.mean()) / np.sqrt(tokens.var(ddof=1) + 1e-8)
    out = np.zeros_like(scores)
    # Every token of a response carries the same value: read it back per row.
    rows = np.repeat(np.arange(len(scores))[:, None], width, 1)[mask]
    out[rows] = whitened
    return out  # empty responses: 0 (verl multiplies by the response mask)


# --- Policy losses per token: value and derivative in log pi_theta(o_t) ------------------------


def numpy_policy_token_loss(name, logp, old_logp, adv, mask, eps_low, eps_high, dual_clip):
    """(loss, derivative) per token, (B, T), float64, for:

    ppo_clip   max(-A rho, -A clip(rho, 1-el, 1+eh)), then min(., -c A) for A < 0 (DAPO, dual clip);
    gspo       GSPO (Zheng et al. 2025, Eq. 5-7): s_i = exp(mean_t log rho_t) in place of rho, every
               token of row i carrying the row's loss;
    gspo_token GSPO-token (Eq. 13): s_it = sg[s_i] pi_t / sg[pi_t], of value s_i;
    cispo      MiniMax-M1 (Eq. 4): -sg(clip(rho, 1-el, 1+eh)) A log pi_t.

    The derivative is d loss / d log(ratio): d l_t / d logp_t for ppo_clip, gspo_token and cispo;
    for gspo, d l_i / d log s_i, which reaches logp_t as 1/|o_i| of it (numpy_policy_gradient).
    """
    logp, old_logp = np.asarray(logp, np.float64), np.asarray(old_logp, np.float64)
    a = np.asarray(adv, np.float64)[:, None] * np.ones_like(logp)
    rho = np.exp(logp - old_logp)
    if name == "cispo":
        weight = np.clip(rho, 1 - eps_low, 1 + eps_high)
        return -weight * a * logp, -weight * a
    if name in ("gspo", "gspo_token"):
        length = np.maximum(mask.sum(-1, keepdims=True), 1)
        rho = np.exp(((logp - old_logp) * mask).sum(-1, keepdims=True) / length) * np.ones_like(logp)
    pessimistic = np.maximum(-a * rho, -a * np.clip(rho, 1 - eps_low, 1 + eps_high))
    # The unclipped branch carries the gradient -A ratio; where the clip wins it is flat.
    slope = np.where(-a * rho >= -a * np.clip(rho, 1 - eps_low, 1 + eps_high), -a * rho, 0.0)
    if name == "ppo_clip":
        dual = (a < 0) & (pessimistic > -a * dual_clip)
        return np.where(dual, -a * dual_clip, pessimistic), np.where(dual, 0.0, slope)
    return pessimistic, slope


def numpy_row_scale(mask, aggregation) -> np.ndarray:
    """(B, 1) factor by which aggregation multiplies a row's token sum: 1/N over all valid
    tokens; 1/(|o_i| n) per sequence over n non-empty rows; 1/(B T) (Dr.GRPO's constant)."""
    mask = np.asarray(mask, np.float64)
    length = mask.sum(-1, keepdims=True)
    if aggregation == "token":
        return np.full_like(length, 1.0 / mask.sum())
    if aggregation == "sequence":
        return np.where(length > 0, 1.0 / np.maximum(length, 1) / (length > 0).sum(), 0.0)
    return np.full_like(length, 1.0 / mask.size)


def numpy_policy_gradient(name, token_grad, weights, mask, aggregation) -> np.ndarray:
    """d(policy term)/d logp (B, T) from numpy_policy_token_loss's per-token derivatives. For
    gspo every token's loss copy depends on every token of its row through s_i: the row's
    derivative sum_t w_t d l_i / d s_i spreads evenly, 1/|o_i| to each valid token."""
    scale = numpy_row_scale(mask, aggregation)
    mask = np.asarray(mask, np.float64)
    if name == "gspo":
        length = np.maximum(mask.sum(-1, keepdims=True), 1)
        row = (token_grad * weights * mask).sum(-1, keepdims=True)
        return scale * row * mask / length
    return scale * token_grad * weights * mask


def numpy_kl(logp, ref_logp, estimator):
    """(k, dk/dlogp) per token for KL(pi || pi_ref) on tokens sampled from pi (Schulman 2020):
    k1 = log(pi/ref), k2 = log(pi/ref)^2 / 2, k3 = ref/pi - log(ref/pi) - 1 (verl's low_var_kl:
    log-ratio clamped to +-20, value to +-10)."""
    d = np.asarray(logp, np.float64) - np.asarray(ref_logp, np.float64)
    if estimator == "k1":
        return d, np.ones_like(d)
    if estimator == "k2":
        return 0.5 * d**2, d
    log_ratio = np.clip(-d, -20, 20)
    return np.clip(np.exp(log_ratio) - log_ratio - 1, -10, 10), 1 - np.exp(log_ratio)
