"""NumPy versions of the paper's formulas that several tests compare against."""

import numpy as np


def numpy_grpo_advantages(rewards, group_size: int) -> np.ndarray:
    """GRPO advantages in float64: (r - mean) / (std with Bessel's correction + 1e-6) per group."""
    grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)
    centred = grouped - grouped.mean(1, keepdims=True)
    return (centred / (grouped.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
