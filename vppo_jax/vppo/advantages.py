"""Group advantages (GRPO's and the estimators researchers swap in) and the online
(dynamic-sampling) group filter of the reference's DAPO recipe.

Rollouts are laid out as consecutive groups of `group_size` (G) responses to the same
prompt: rollout i belongs to group i // G. Every estimator gives one scalar per response
(outcome rewards), shared by its tokens.
"""

import jax.numpy as jnp

ADVANTAGE_EPS = 1e-6
WHITEN_EPS = 1e-8  # verl's masked_whiten: (x - mean) * rsqrt(var + 1e-8)
ACCURACY_BOUNDS = (0.01, 0.99)


def _grouped(values, group_size):
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 rollouts per group, got {group_size}")
    if values.shape[0] % group_size:
        raise ValueError(f"{values.shape[0]} rollouts are not a whole number of groups of {group_size}")
    return values.astype(jnp.float32).reshape(-1, group_size)


def grpo_advantages(rewards, group_size):
    """A_i = (r_i - mean_group(r)) / (std_group(r, ddof=1) + 1e-6), one scalar per rollout.

    Args:
      rewards: (R,) scalar rewards, R a multiple of group_size.
      group_size: G (static).
    Returns:
      (R,) fp32 advantages. A group with equal rewards gets all zeros.
    """
    groups = _grouped(rewards, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    std = jnp.std(groups, axis=1, ddof=1, keepdims=True)
    return (centred / (std + ADVANTAGE_EPS)).reshape(-1)


def dr_grpo_advantages(rewards, group_size):
    """Dr.GRPO: A_i = r_i - mean_group(r), without GRPO's division by the group's std."""
    groups = _grouped(rewards, group_size)
    return (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)


def rloo_advantages(rewards, group_size):
    """RLOO: A_i = r_i - mean_{j != i in the group} r_j = G / (G - 1) (r_i - mean_group(r))."""
    return dr_grpo_advantages(rewards, group_size) * group_size / (group_size - 1)


def reinforce_pp_baseline_advantages(rewards, group_size, lengths):
    """REINFORCE++ with a group baseline (verl's reinforce_plus_plus_baseline): c_i = r_i -
    mean_group(r), then whitened over every valid response token of the batch: a response
    counts |o_i| = lengths[i] times in the mean and the unbiased variance,

        A_i = (c_i - mu) / sqrt(var + 1e-8),  mu = sum_i |o_i| c_i / N,
        var = sum_i |o_i| (c_i - mu)^2 / (N - 1),  N = sum_i |o_i|.
    """
    centred = dr_grpo_advantages(rewards, group_size)
    weights = jnp.asarray(lengths, jnp.float32)
    tokens = weights.sum()
    mean = (weights * centred).sum() / jnp.maximum(tokens, 1.0)
    variance = (weights * (centred - mean) ** 2).sum() / jnp.maximum(tokens - 1.0, 1.0)
    return (centred - mean) / jnp.sqrt(variance + WHITEN_EPS)


ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


def advantages(name, rewards, group_size, lengths):
    """The `name` estimator's advantages (R,) of R rollouts with `lengths` valid response
    tokens each (only REINFORCE++'s batch whitening weighs rows by them)."""
    if name == "reinforce_pp_baseline":
        return reinforce_pp_baseline_advantages(rewards, group_size, lengths)
    by_name = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}
    if name not in by_name:
        raise ValueError(f"advantage={name!r}; choose one of {ADVANTAGES}.")
    return by_name[name](rewards, group_size)


def online_group_filter(accuracies, group_size, bounds=ACCURACY_BOUNDS):
    """Dynamic sampling: keep groups whose mean accuracy lies strictly inside `bounds`.

    Groups that are all right or all wrong have zero advantage and carry no signal.
    Returns:
      (keep_group (R/G,) bool, keep_rollout (R,) bool).
    """
    low, high = bounds
    mean_accuracy = _grouped(accuracies, group_size).mean(axis=1)
    keep_group = (mean_accuracy > low) & (mean_accuracy < high)
    return keep_group, jnp.repeat(keep_group, group_size)
