"""The policy losses, advantage estimators and KL estimators researchers swap in (GSPO,
GSPO-token, CISPO, Dr.GRPO's constant normaliser; Dr.GRPO, RLOO and REINFORCE++ baseline
advantages; k1, k2, k3 to a reference) against NumPy written from their papers' equations
(tests/numpy_reference.py), with TAS and TGF on, and exact over micro-batches."""

import jax
import numpy as np
import pytest

from vppo_jax.vppo import advantages as advantages_lib
from vppo_jax.vppo.loss import LossConfig, kl_estimate, loss_counts, loss_sums, policy_loss, sequence_kl, total_loss
from vppo_jax.vppo.step import StepConfig

from numpy_reference import (
    numpy_dr_grpo_advantages,
    numpy_grpo_advantages,
    numpy_kl,
    numpy_policy_gradient,
    numpy_policy_token_loss,
    numpy_reinforce_pp_baseline_advantages,
    numpy_rloo_advantages,
    numpy_row_scale,
)

B, T = 6, 9
EPS_LOW, EPS_HIGH, DUAL, ENTROPY_COEF = 0.2, 0.28, 3.0, 0.06
LOSSES = ("ppo_clip", "gspo", "gspo_token", "cispo")
AGGREGATIONS = ("token", "sequence", "constant")
NAMES = ("logp", "old_logp", "adv", "mask", "alpha", "weights", "ref_logp")


@pytest.fixture(scope="module")
def batch():
    """Log-ratios up to +-1.5 put tokens in every branch of the clips (rows 1 and 3, A < 0, get
    some rho > 3 for the dual clip); row 0 puts GSPO's mean ratio beyond its range."""
    rng = np.random.default_rng(0)
    old_logp = rng.uniform(-4, -0.1, (B, T))
    log_ratio = rng.uniform(-1.5, 1.5, (B, T))
    log_ratio[[1, 3], :3] = 1.2
    log_ratio[0] = rng.uniform(0.3, 0.6, T)  # GSPO's s_0 above 1 + eps_high (A > 0: clipped)
    log_ratio[[1, 5], 3] = (0.05, -0.1)  # TGF-kept tokens inside every clip range
    lengths = np.array([9, 4, 7, 0, 1, 6])  # includes an empty response
    mask = np.arange(T)[None] < lengths[:, None]
    values = dict(
        logp=old_logp + log_ratio,
        old_logp=old_logp,
        adv=np.array([1.2, -0.7, 0.0, -1.5, 0.4, 2.0]),
        mask=mask,
        alpha=rng.uniform(0.9, 1.3, B),
        weights=(rng.uniform(size=(B, T)) < 0.5) | (np.arange(T) == 3),
        ref_logp=old_logp + rng.normal(0, 0.3, (B, T)),
    )
    values["weights"] = values["weights"].astype(float)
    return {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v for k, v in values.items()}


def numpy_loss_and_grad(b, name, aggregation, kl_coef=0.0, kl_estimator="k3"):
    """The whole batch's loss and d loss / d logp, float64, from numpy_reference's equations:
    weighted policy term + entropy term + KL term (every valid token, aggregated alike)."""
    x = {k: np.asarray(v, np.float64) for k, v in b.items()}
    mask = x["mask"]
    weights = mask if name == "gspo" else x["weights"]  # GSPO takes no TGF weights (refused)
    token_loss, token_grad = numpy_policy_token_loss(
        name, x["logp"], x["old_logp"], x["alpha"] * x["adv"], mask, EPS_LOW, EPS_HIGH, DUAL
    )
    scale = numpy_row_scale(mask, aggregation)
    kl, kl_grad = numpy_kl(x["logp"], x["ref_logp"], kl_estimator)
    loss = (scale * token_loss * weights * mask).sum()
    loss += ENTROPY_COEF * (-x["logp"] * mask).sum() / mask.sum() + kl_coef * (scale * kl * mask).sum()
    grad = numpy_policy_gradient(name, token_grad, weights, mask, aggregation)
    grad += -ENTROPY_COEF * mask / mask.sum() + kl_coef * scale * kl_grad * mask
    return loss, grad


def jax_loss(b, config, logp=None):
    weights = None if config.policy_loss == "gspo" else b["weights"]
    args = (b["old_logp"], b["adv"], b["mask"], b["alpha"], weights, b["ref_logp"] if config.kl_coef else None)
    return policy_loss(b["logp"] if logp is None else logp, *args, config=config)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_and_its_gradient_match_numpy(batch, name, aggregation):
    config = LossConfig(policy_loss=name, aggregation=aggregation)
    loss, metrics = jax.jit(jax_loss, static_argnums=1)(batch, config)
    grad = jax.grad(lambda lp: jax_loss(batch, config, lp)[0])(batch["logp"])
    expected_loss, expected_grad = numpy_loss_and_grad(batch, name, aggregation)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-8)
    assert np.abs(expected_grad).max() > 1e-3
    clipped = float(metrics["clipfrac_high"]) + float(metrics["clipfrac_low"])
    assert clipped > 0  # the clip range is reached, so the check covers both branches


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_and_the_kl_loss_term_match_numpy(batch, estimator):
    expected, _ = numpy_kl(batch["logp"], batch["ref_logp"], estimator)
    np.testing.assert_allclose(
        np.asarray(kl_estimate(batch["logp"], batch["ref_logp"], estimator)), expected, rtol=2e-5, atol=1e-6
    )
    mask = batch["mask"]
    np.testing.assert_allclose(
        np.asarray(sequence_kl(batch["logp"], batch["ref_logp"], mask, estimator)),
        (expected * mask).sum(-1),
        rtol=2e-5,
        atol=1e-6,
    )
    for name, aggregation in (("ppo_clip", "token"), ("gspo_token", "sequence"), ("cispo", "constant")):
        config = LossConfig(policy_loss=name, aggregation=aggregation, kl_coef=0.3, kl_estimator=estimator)
        loss = float(jax_loss(batch, config)[0])
        grad = jax.grad(lambda lp: jax_loss(batch, config, lp)[0])(batch["logp"])
        expected_loss, expected_grad = numpy_loss_and_grad(batch, name, aggregation, 0.3, estimator)
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-7)  # k1's signed terms cancel
        np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("name", LOSSES)
def test_micro_batches_with_global_counts_give_the_whole_batch_gradient(batch, name, aggregation):
    """Each micro-batch's sums over the whole batch's counts: the gradients add up exactly (a
    row, GSPO's mean over it included, lies in one micro-batch)."""
    config = LossConfig(policy_loss=name, aggregation=aggregation, kl_coef=0.1)
    full = [batch[k] for k in NAMES]
    if name == "gspo":
        full[NAMES.index("weights")] = batch["mask"].astype(np.float32)
    counts = loss_counts(batch["mask"], aggregation)

    @jax.jit
    @jax.grad
    def micro_grad(logp, *rest):
        return total_loss(loss_sums(logp, *rest, config=config)[0], counts, config)

    _, expected = numpy_loss_and_grad(batch, name, aggregation, 0.1)
    parts = [slice(0, 2), slice(2, 3), slice(3, B)]
    accumulated = np.concatenate([np.asarray(micro_grad(*(x[rows] for x in full))) for rows in parts])
    np.testing.assert_allclose(accumulated, expected, rtol=1e-5, atol=1e-8)


def test_gspo_and_gspo_token_agree_without_tgf(batch):
    """With one advantage per response the two GSPO forms have the same loss and gradient (GSPO
    paper, Sec. 4.3); on-policy (pi_theta = pi_old) both ratios are exactly 1."""
    grads = []
    for name in ("gspo", "gspo_token"):
        config = LossConfig(policy_loss=name, aggregation="sequence")
        fn = lambda lp: policy_loss(lp, batch["old_logp"], batch["adv"], batch["mask"], config=config)[0]
        grads.append(np.asarray(jax.grad(fn)(batch["logp"])))
        _, metrics = policy_loss(batch["old_logp"], batch["old_logp"], batch["adv"], batch["mask"], config=config)
        assert float(metrics["ratio"]) == 1.0
    np.testing.assert_allclose(*grads, rtol=1e-6, atol=1e-9)


def test_advantage_estimators_match_numpy():
    rng = np.random.default_rng(3)
    group = 4
    rewards = rng.integers(0, 2, 24).astype(np.float32)
    rewards[:4] = 1.0  # a group with equal rewards
    rewards[4:8] = rng.normal(size=4)  # non-binary rewards (a KL penalty makes them so)
    lengths = rng.integers(0, 30, 24)
    lengths[5] = 0  # an empty response
    expected = {
        "grpo": numpy_grpo_advantages(rewards, group),
        "dr_grpo": numpy_dr_grpo_advantages(rewards, group),
        "rloo": numpy_rloo_advantages(rewards, group),
        "reinforce_pp_baseline": numpy_reinforce_pp_baseline_advantages(rewards, group, lengths),
    }
    assert set(expected) == set(advantages_lib.ADVANTAGES)
    for name, values in expected.items():
        got = np.asarray(advantages_lib.advantages(name, rewards, group, lengths))
        valid = lengths > 0  # an empty response's advantage reaches no token
        np.testing.assert_allclose(got[valid], values[valid], rtol=1e-5, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="advantage='ppo'; choose one of"):
        advantages_lib.advantages("ppo", rewards, group, lengths)


def test_refused_combinations_say_what_to_use():
    """GSPO's sequence-level loss has no per-token term for TGF to keep or drop: refused, with
    the fix named; the token form and GSPO without TGF are fine, and so is every other pairing."""
    with pytest.raises(ValueError, match=r"policy_loss='gspo' has no per-token term for TGF to filter: use"):
        StepConfig(loss=LossConfig(policy_loss="gspo"))
    StepConfig(vppo=False, loss=LossConfig(policy_loss="gspo"))  # no TGF in the baseline
    for name in LOSSES[2:]:
        for mode in ("dependency", "soft"):
            StepConfig(tgf_mode=mode, loss=LossConfig(policy_loss=name, aggregation="constant", kl_coef=0.1))
    with pytest.raises(ValueError, match="policy_loss='grpo'; choose one of"):
        LossConfig(policy_loss="grpo")
    with pytest.raises(ValueError, match="kl_estimator='low_var_kl'; choose one of"):
        LossConfig(kl_estimator="low_var_kl")
