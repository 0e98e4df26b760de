"""GRPO advantages, group filter (the reference's DAPO recipe), TAS (paper Eq. 5) and TGF
(paper Eq. 6)."""

from decimal import ROUND_CEILING, Decimal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vppo_jax.vppo import advantages, shaping

from numpy_reference import numpy_grpo_advantages

G = 4


# ---------------------------------------------------------------- GRPO advantages, filter


def test_grpo_advantages_match_numpy_per_group():
    rewards = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0.5, 0, 1, 0.25], np.float32)
    expected = numpy_grpo_advantages(rewards, G)
    got = jax.jit(advantages.grpo_advantages, static_argnums=1)(rewards, G)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[4:8], 0.0)  # all-equal group


def test_grpo_needs_two_rollouts_per_group():
    with pytest.raises(ValueError):
        advantages.grpo_advantages(jnp.ones(4), 1)


def test_online_group_filter_keeps_strictly_mixed_groups():
    group_size = 8
    correct_per_group = [0, 1, 4, 7, 8]
    accuracy = np.concatenate([np.arange(group_size) < c for c in correct_per_group]).astype(float)
    keep_group, keep_rollout = advantages.online_group_filter(accuracy, group_size)
    np.testing.assert_array_equal(np.asarray(keep_group), [False, True, True, True, False])
    np.testing.assert_array_equal(np.asarray(keep_rollout), np.repeat([False, True, True, True, False], group_size))


# ---------------------------------------------------------------- TAS


def np_trajectory_dependency(scores, mask):
    return (scores * mask).sum(-1) / np.maximum(mask.sum(-1), 1)


def np_alpha(sbar, valid, mode, beta_min, beta_max, scope_size):
    """Eq. 5 with the reference code's dynamic beta_max and degenerate cases, scope by scope."""
    alpha = np.ones(len(sbar))
    for start in range(0, len(sbar), scope_size):
        index = np.arange(start, start + scope_size)
        index = index[valid[index]]
        if len(index) < 2 or sbar[index].max() - sbar[index].min() <= 1e-6:
            continue
        low, high = sbar[index].min(), sbar[index].max()
        n = np.clip((sbar[index] - low) / (high - low), 0, 1)
        top = beta_min + (1 - beta_min) / (n.mean() + 1e-8) if mode == "dynamic" else beta_max
        alpha[index] = beta_min + (top - beta_min) * n
    return alpha


def test_trajectory_dependency_is_the_mean_over_response_tokens():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 2, (5, 7))
    mask = np.arange(7)[None] < np.array([7, 3, 0, 1, 5])[:, None]  # includes |o| = 0
    got = shaping.trajectory_dependency(scores, mask)
    np.testing.assert_allclose(np.asarray(got), np_trajectory_dependency(scores, mask), rtol=1e-6)
    assert float(got[2]) == 0.0


@pytest.mark.parametrize("mode,beta_max", [("dynamic", None), ("static", 1.2)])
@pytest.mark.parametrize("scope", ["global", "per_group"])
def test_advantage_scale_matches_numpy(mode, beta_max, scope):
    rng = np.random.default_rng(1)
    sbar = rng.exponential(0.3, 16)
    valid = np.ones(16, bool)
    valid[[2, 9]] = False
    sbar[2] = 100.0  # an invalid outlier must not move min/max
    scope_size = 16 if scope == "global" else G
    fn = jax.jit(shaping.advantage_scale, static_argnames=("mode", "beta_min", "beta_max", "scope", "group_size"))
    got = fn(sbar, valid, mode=mode, beta_min=0.9, beta_max=beta_max, scope=scope, group_size=G)
    expected = np_alpha(sbar, valid, mode, 0.9, beta_max, scope_size)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
    assert np.all(np.asarray(got)[~valid] == 1.0)


def test_dynamic_alpha_averages_to_one_over_valid_rollouts():
    rng = np.random.default_rng(2)
    sbar = rng.exponential(1.0, 32)
    valid = rng.uniform(size=32) < 0.8
    alpha = np.asarray(shaping.advantage_scale(sbar, valid))
    np.testing.assert_allclose(alpha[valid].mean(), 1.0, rtol=1e-5)
    assert alpha[valid].min() == pytest.approx(0.9, abs=1e-6)


@pytest.mark.parametrize("case", ["all_equal", "nearly_equal", "single_valid", "none_valid"])
def test_advantage_scale_degenerate_cases_give_one(case):
    sbar = np.linspace(0.0, 1.0, 8)
    valid = np.ones(8, bool)
    if case == "all_equal":
        sbar = np.full(8, 0.4)
    elif case == "nearly_equal":
        sbar = 0.4 + np.linspace(0.0, 5e-7, 8)
    elif case == "single_valid":
        valid[1:] = False
    else:
        valid[:] = False
    for scope in ("global", "per_group"):
        alpha = shaping.advantage_scale(sbar, valid, scope=scope, group_size=G)
        np.testing.assert_array_equal(np.asarray(alpha), 1.0)


def test_per_group_scope_degenerates_group_by_group():
    sbar = np.array([0.5, 0.5, 0.5, 0.5, 0.1, 0.2, 0.3, 0.4])
    alpha = np.asarray(shaping.advantage_scale(sbar, np.ones(8, bool), scope="per_group", group_size=G))
    np.testing.assert_array_equal(alpha[:4], 1.0)
    np.testing.assert_allclose(alpha[4:], np_alpha(sbar, np.ones(8, bool), "dynamic", 0.9, None, G)[4:], rtol=1e-6)
    assert alpha[4] < alpha[7]


# ---------------------------------------------------------------- TGF


def exact_ceil(k, length):
    return int((Decimal(repr(k)) * length).to_integral_value(rounding=ROUND_CEILING))


@pytest.mark.parametrize("k", [0.0, 0.07, 0.2, 0.28, 0.3, 0.4, 0.6, 1.0])
def test_selection_count_is_the_exact_ceiling(k):
    lengths = np.arange(0, 4097)
    got = np.asarray(shaping.selection_count(jnp.asarray(lengths), k))
    np.testing.assert_array_equal(got, [exact_ceil(k, n) for n in lengths])


def test_selection_count_examples_where_float_rounding_would_bump():
    assert list(np.asarray(shaping.selection_count(jnp.array([5, 10, 3]), 0.4))) == [2, 4, 2]
    # float32 0.3 * 50 = 15.000001 and float64 0.28 * 25 = 7.000000000000001.
    assert int(shaping.selection_count(jnp.array([50]), 0.3)[0]) == 15
    assert int(shaping.selection_count(jnp.array([25]), 0.28)[0]) == 7


def np_top_fraction(scores, mask, k):
    selected = np.zeros(scores.shape)
    for row in range(scores.shape[0]):
        positions = np.flatnonzero(mask[row])
        ranked = sorted(positions, key=lambda t: (-scores[row, t], t))
        selected[row, ranked[: exact_ceil(k, len(positions))]] = 1.0
    return selected


@pytest.mark.parametrize("k", [0.2, 0.4, 1.0])
def test_top_fraction_mask_matches_numpy_with_ties_and_padding(k):
    rng = np.random.default_rng(3)
    lengths = np.array([10, 5, 0, 1, 7, 3])
    mask = np.arange(10)[None] < lengths[:, None]
    scores = rng.integers(0, 3, (6, 10)).astype(np.float32)  # many ties
    scores[~mask] = 99.0  # padding must never be selected, however large its score
    got = np.asarray(jax.jit(shaping.top_fraction_mask, static_argnums=2)(scores, mask, k))
    np.testing.assert_array_equal(got, np_top_fraction(scores, mask, k))
    np.testing.assert_array_equal(got.sum(-1), [exact_ceil(k, n) for n in lengths])


def test_token_filter_modes():
    rng = np.random.default_rng(4)
    lengths = np.array([12, 9, 0, 4])
    mask = np.arange(12)[None] < lengths[:, None]
    dep = rng.exponential(size=(4, 12)).astype(np.float32)
    entropy = rng.exponential(size=(4, 12)).astype(np.float32)
    counts = [exact_ceil(0.4, n) for n in lengths]

    by_dependency = shaping.token_filter("dependency", mask, 0.4, token_dependency=dep)
    np.testing.assert_array_equal(np.asarray(by_dependency), np_top_fraction(dep, mask, 0.4))
    by_entropy = shaping.token_filter("entropy", mask, 0.4, token_entropy=entropy)
    np.testing.assert_array_equal(np.asarray(by_entropy), np_top_fraction(entropy, mask, 0.4))

    draws = [np.asarray(shaping.token_filter("random", mask, 0.4, key=jax.random.key(seed))) for seed in range(2)]
    for draw in draws:
        np.testing.assert_array_equal(draw.sum(-1), counts)
        assert np.all(draw[~mask] == 0)
    assert not np.array_equal(draws[0], draws[1])

    with pytest.raises(ValueError):
        shaping.token_filter("entropy", mask, 0.4, token_dependency=dep)


def test_soft_weights_are_dependency_over_row_maximum():
    dep = np.array([[0.2, 0.8, 0.4, 5.0], [0.0, 0.0, 0.0, 0.0], [-0.3, 0.6, 0.3, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    expected = np.array([[0.25, 1.0, 0.5, 0.0], [0, 0, 0, 0], [0.0, 1.0, 0.5, 0.0]])
    got = shaping.token_filter("soft", mask, 0.4, token_dependency=dep)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
