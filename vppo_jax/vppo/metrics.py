"""What one update reports: loss terms, gradient norm, entropy, TAS/TGF and dependency statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dependency_metrics(dependency, response_mask) -> dict[str, jax.Array]:
    """Token dependency over response tokens (mean, median, p90, max) and its trajectory mean."""
    mask = response_mask.astype(bool)
    values = jnp.where(mask, dependency, jnp.nan)
    lengths = jnp.maximum(mask.sum(-1), 1)
    trajectory = jnp.where(mask.any(-1), jnp.where(mask, dependency, 0.0).sum(-1) / lengths, jnp.nan)
    return {
        "dependency/token_mean": jnp.nanmean(values),
        "dependency/token_p50": jnp.nanquantile(values, 0.5),
        "dependency/token_p90": jnp.nanquantile(values, 0.9),
        "dependency/token_max": jnp.nanmax(values),
        "dependency/trajectory_mean": jnp.nanmean(trajectory),
    }


def step_metrics(
    vppo: bool, loss, sums, metric_sums, counts, grad_norm, finite, per_token, response_mask
) -> dict[str, jax.Array]:
    """Per-token statistics are means over the batch's response tokens; `per_token` holds
    (M, b, T) entropy, TGF weights and dependency and (M, b) TAS alphas."""
    tokens = jnp.maximum(counts.tokens, 1.0)
    alpha, weights, entropy = per_token["alpha"], per_token["weights"], per_token["entropy"]
    mask = response_mask.astype(jnp.float32)
    valid_rows = response_mask.any(-1)
    metrics = {name: value / tokens for name, value in metric_sums.items()}
    metrics |= {
        "loss": loss,
        "pg_loss": sums.policy / jnp.maximum(counts.policy, 1.0),
        "entropy_loss": sums.entropy / tokens,
        "kl_loss": sums.kl / jnp.maximum(counts.policy, 1.0),  # 0 unless algo.kl_coef
        "entropy": (entropy * mask).sum() / tokens,
        "grad_norm": grad_norm,
        "skipped": (~finite).astype(jnp.float32),
        "response_tokens": counts.tokens,
        "tgf/selected_fraction": (weights * mask).sum() / tokens,
        "tas/alpha_mean": jnp.where(valid_rows, alpha, 0.0).sum() / jnp.maximum(valid_rows.sum(), 1),
        "tas/alpha_min": jnp.min(jnp.where(valid_rows, alpha, jnp.inf)),
        "tas/alpha_max": jnp.max(jnp.where(valid_rows, alpha, -jnp.inf)),
    }
    if vppo:
        metrics |= dependency_metrics(per_token["dependency"], response_mask)
    return metrics
