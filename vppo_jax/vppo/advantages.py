"""GRPO group advantages and the online (dynamic-sampling) group filter of the reference's DAPO recipe.

Rollouts are laid out as consecutive groups of `group_size` (G) responses to the same
prompt: rollout i belongs to group i // G.
"""

import jax.numpy as jnp

ADVANTAGE_EPS = 1e-6
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
