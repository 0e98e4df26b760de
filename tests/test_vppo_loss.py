"""The VPPO policy loss (the reference's DAPO-style recipe) and Theorem 3.1 against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vppo_jax.vppo import advantages, logprobs, shaping
from vppo_jax.vppo.loss import LossConfig, loss_counts, loss_sums, policy_loss, total_loss

B, T = 6, 9
EPS_LOW, EPS_HIGH, DUAL, ENTROPY_COEF = 0.2, 0.28, 3.0, 0.06


def np_token_loss(logp, old_logp, shaped_advantage):
    """verl's compute_policy_loss per token: clip-higher, then dual-clip for A < 0."""
    ratio = np.exp(np.clip(logp - old_logp, -20, 20))
    a = shaped_advantage[:, None]
    pessimistic = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - EPS_LOW, 1 + EPS_HIGH))
    return np.where(a < 0, np.minimum(pessimistic, -a * DUAL), pessimistic), ratio


def np_loss(logp, old_logp, adv, mask, alpha, weights, ref_logp, kl_coef, aggregation):
    token_loss, _ = np_token_loss(logp, old_logp, alpha * adv)
    length = mask.sum(-1)

    def aggregate(per_token, w):
        if aggregation == "token":
            return (per_token * w * mask).sum() / mask.sum()
        nonempty = length > 0
        return ((per_token * w * mask).sum(-1)[nonempty] / length[nonempty]).mean()

    d = np.clip(ref_logp - logp, -20, 20)
    kl = np.clip(np.exp(d) - d - 1, -10, 10)  # verl's low_var_kl
    entropy = (-logp * mask).sum() / mask.sum()
    return aggregate(token_loss, weights) + ENTROPY_COEF * entropy + kl_coef * aggregate(kl, 1.0)


def np_loss_grad(logp, old_logp, adv, mask, alpha, weights):
    """d loss / d logp (token aggregation, no KL): only the unclipped branch carries -A' rho."""
    a = (alpha * adv)[:, None]
    ratio = np.exp(logp - old_logp)
    clipped = np.where(a > 0, ratio > 1 + EPS_HIGH, ratio < 1 - EPS_LOW)
    dual = (a < 0) & (ratio > DUAL)
    policy = np.where(clipped | dual, 0.0, -a * ratio)
    return (policy * weights - ENTROPY_COEF) * mask / mask.sum()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    old_logp = rng.uniform(-4, -0.1, (B, T))
    # Log-ratios up to +-1.5 put tokens in every branch: rho < 0.8 and rho > 1.28; the
    # rows with A < 0 also get some rho > 3 (log-ratio 1.2), where the dual clip acts.
    log_ratio = rng.uniform(-1.5, 1.5, (B, T))
    log_ratio[[1, 3], :3] = 1.2
    logp = old_logp + log_ratio
    ref_logp = old_logp + rng.normal(0, 0.3, (B, T))
    adv = np.array([1.2, -0.7, 0.0, -1.5, 0.4, 2.0])
    alpha = rng.uniform(0.9, 1.3, B)
    lengths = np.array([9, 4, 7, 0, 1, 6])  # includes an empty response
    mask = np.arange(T)[None] < lengths[:, None]
    weights = (rng.uniform(size=(B, T)) < 0.5).astype(float)
    return {
        name: np.asarray(value, np.float32) if value.dtype.kind == "f" else value
        for name, value in dict(
            logp=logp, old_logp=old_logp, ref_logp=ref_logp, adv=adv, alpha=alpha, mask=mask, weights=weights
        ).items()
    }


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_loss_matches_numpy(batch, aggregation, kl_coef):
    config = LossConfig(kl_coef=kl_coef, aggregation=aggregation)
    fn = jax.jit(policy_loss, static_argnames="config")
    loss, metrics = fn(
        batch["logp"],
        batch["old_logp"],
        batch["adv"],
        batch["mask"],
        batch["alpha"],
        batch["weights"],
        batch["ref_logp"],
        config=config,
    )
    expected = np_loss(
        *(batch[k].astype(np.float64) for k in ("logp", "old_logp", "adv", "mask", "alpha", "weights", "ref_logp")),
        kl_coef,
        aggregation,
    )
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    recombined = metrics["pg_loss"] + ENTROPY_COEF * metrics["entropy_loss"] + kl_coef * metrics["kl_loss"]
    np.testing.assert_allclose(float(recombined), float(loss), rtol=1e-6)


def test_clip_fraction_metrics_match_numpy(batch):
    _, metrics = policy_loss(
        batch["logp"], batch["old_logp"], batch["adv"], batch["mask"], batch["alpha"], batch["weights"]
    )
    mask = batch["mask"]
    a = (batch["alpha"] * batch["adv"])[:, None] * np.ones((B, T))
    ratio = np.exp(batch["logp"].astype(np.float64) - batch["old_logp"])
    expected = {
        "clipfrac_high": (a > 0) & (ratio > 1 + EPS_HIGH),
        "clipfrac_low": (a < 0) & (ratio < 1 - EPS_LOW),
        "clipfrac_dual": (a < 0) & (ratio > DUAL),
        "ratio": ratio,
        "selected_weight": batch["weights"],
    }
    for name, per_token in expected.items():
        value = (per_token * mask).sum() / mask.sum()
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, err_msg=name)
    assert all(float(metrics[name]) > 0 for name in ("clipfrac_high", "clipfrac_low", "clipfrac_dual"))


def test_gradient_matches_numpy(batch):
    args = [batch[k] for k in ("old_logp", "adv", "mask", "alpha", "weights")]
    grad = jax.grad(lambda lp: policy_loss(lp, *args)[0])(batch["logp"])
    expected = np_loss_grad(batch["logp"].astype(np.float64), *args)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_gradient_accumulation_with_global_counts_is_exact(batch, aggregation):
    config = LossConfig(kl_coef=0.1, aggregation=aggregation)
    names = ("logp", "old_logp", "adv", "mask", "alpha", "weights", "ref_logp")
    full = [batch[k] for k in names]
    counts = loss_counts(batch["mask"], aggregation)

    @jax.jit
    @jax.grad
    def micro_grad(logp, *rest):
        sums, _ = loss_sums(logp, *rest, config=config)
        return total_loss(sums, counts, config)

    whole = jax.grad(lambda lp: policy_loss(lp, *full[1:], config=config)[0])(batch["logp"])
    parts = [slice(0, 2), slice(2, 3), slice(3, B)]
    accumulated = np.concatenate([np.asarray(micro_grad(*(x[rows] for x in full))) for rows in parts])
    np.testing.assert_allclose(accumulated, np.asarray(whole), rtol=1e-6, atol=1e-9)


def test_unselected_tokens_get_exactly_zero_gradient_without_entropy_term(batch):
    """TGF (paper Eq. 6): the policy-gradient term of unselected tokens is zero."""
    rng = np.random.default_rng(1)
    hidden_size, vocab = 8, 23
    hidden = rng.normal(size=(B, T, hidden_size)).astype(np.float32)
    unembedding = rng.normal(size=(hidden_size, vocab)).astype(np.float32)
    tokens = rng.integers(0, vocab, (B, T))
    config = LossConfig(entropy_coef=0.0)

    def loss_of_hidden(h):
        logp, _ = logprobs.token_logprobs_and_entropy(h, unembedding, tokens, chunk_size=4)
        return policy_loss(
            logp, batch["old_logp"], batch["adv"], batch["mask"], batch["alpha"], batch["weights"], config=config
        )[0]

    grad_hidden = np.asarray(jax.grad(loss_of_hidden)(hidden))
    unselected = batch["weights"] == 0
    assert np.all(grad_hidden[unselected] == 0.0)
    assert np.any(grad_hidden[~unselected] != 0.0)

    grad_logp = jax.grad(
        lambda lp: policy_loss(
            lp, batch["old_logp"], batch["adv"], batch["mask"], batch["alpha"], batch["weights"], config=config
        )[0]
    )(batch["logp"])
    assert np.all(np.asarray(grad_logp)[unselected] == 0.0)


def test_entropy_penalty_reaches_unselected_tokens(batch):
    """The reference applies 0.06 * mean(-logp) over ALL valid tokens, selected or not."""
    no_policy_weight = np.zeros((B, T), np.float32)
    grad = jax.grad(
        lambda lp: policy_loss(lp, batch["old_logp"], batch["adv"], batch["mask"], token_weights=no_policy_weight)[0]
    )(batch["logp"])
    expected = -ENTROPY_COEF * batch["mask"] / batch["mask"].sum()
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6)


def test_alpha_scales_each_rollouts_gradient_linearly(batch):
    config = LossConfig(entropy_coef=0.0)

    def grad_for(alpha):
        return np.asarray(
            jax.grad(
                lambda lp: policy_loss(
                    lp, batch["old_logp"], batch["adv"], batch["mask"], alpha, batch["weights"], config=config
                )[0]
            )(batch["logp"])
        )

    unshaped = grad_for(np.ones(B, np.float32))
    np.testing.assert_allclose(grad_for(batch["alpha"]), batch["alpha"][:, None] * unshaped, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        grad_for(2.5 * batch["alpha"]), 2.5 * batch["alpha"][:, None] * unshaped, rtol=1e-6, atol=1e-9
    )


def test_k_one_and_alpha_one_reproduce_plain_grpo(batch):
    rng = np.random.default_rng(2)
    token_dep = rng.exponential(size=(B, T)).astype(np.float32)
    sbar = shaping.trajectory_dependency(token_dep, batch["mask"])
    alpha = shaping.advantage_scale(sbar, batch["mask"].any(-1), mode="static", beta_min=1.0, beta_max=1.0)
    weights = shaping.token_filter("dependency", batch["mask"], 1.0, token_dependency=token_dep)
    args = (batch["old_logp"], batch["adv"], batch["mask"])

    def vppo(lp):
        return policy_loss(lp, *args, alpha=alpha, token_weights=weights)[0]

    def grpo(lp):
        return policy_loss(lp, *args)[0]

    np.testing.assert_allclose(float(vppo(batch["logp"])), float(grpo(batch["logp"])), atol=1e-6)
    plain = np_loss(
        *(batch[k].astype(np.float64) for k in ("logp", "old_logp", "adv", "mask")),
        np.ones(B),
        np.ones((B, T)),
        batch["logp"].astype(np.float64),
        0.0,
        "token",
    )
    np.testing.assert_allclose(float(grpo(batch["logp"])), plain, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(jax.grad(vppo)(batch["logp"])), np.asarray(jax.grad(grpo)(batch["logp"])), atol=1e-6
    )


def test_theorem_3_1_variance_ratio_by_monte_carlo():
    """Var(g_VPPO) ~= k E[alpha^2] Var(g_GRPO) (the paper's Theorem 3.1), under its assumptions.

    Toy policy: log pi(o_t) = theta . v_t with v_t ~ N(0, I_d) i.i.d. (uncorrelated steps,
    constant E||v_t||^2), evaluated at theta = 0 = theta_old (on-policy, rho = 1). Rewards,
    hence A, and the dependency scores behind alpha and K are drawn independently of v.
    Per-rollout gradients come from the real pipeline: grpo_advantages, advantage_scale,
    top_fraction_mask and loss_sums.
    """
    groups_per_batch, group_size, batches = 8, 8, 256
    length, dim, k = 40, 8, 0.4
    rollouts = groups_per_batch * group_size * batches
    mask = jnp.ones((rollouts, length), bool)

    def rollout_gradient(v_i, adv_i, alpha_i, weights_i):
        def policy_sum(theta):
            logp = (v_i @ theta)[None]
            sums, _ = loss_sums(
                logp, jax.lax.stop_gradient(logp), adv_i[None], mask[:1], alpha_i[None], weights_i[None]
            )
            return sums.policy

        return jax.grad(policy_sum)(jnp.zeros(dim))

    @jax.jit
    def simulate(key):
        keys = jax.random.split(key, 4)
        v = jax.random.normal(keys[0], (rollouts, length, dim))
        rewards = jax.random.bernoulli(keys[1], 0.5, (rollouts,)).astype(jnp.float32)
        adv = advantages.grpo_advantages(rewards, group_size)
        sbar = jax.random.exponential(keys[2], (batches, groups_per_batch * group_size))
        # beta_min 0.5 widens alpha so that E[alpha^2] differs visibly from 1.
        alpha = jax.vmap(lambda s: shaping.advantage_scale(s, jnp.ones_like(s, bool), beta_min=0.5))(sbar).reshape(-1)
        selected = shaping.top_fraction_mask(jax.random.uniform(keys[3], (rollouts, length)), mask, k)
        g_vppo = jax.vmap(rollout_gradient)(v, adv, alpha, selected)
        g_grpo = jax.vmap(rollout_gradient)(v, adv, jnp.ones(rollouts), jnp.ones_like(selected))
        variance = lambda g: jnp.sum(jnp.var(g, axis=0))  # trace of the covariance
        return variance(g_vppo) / variance(g_grpo), jnp.mean(alpha**2)

    measured, alpha_second_moment = (float(x) for x in simulate(jax.random.key(0)))
    predicted = k * alpha_second_moment
    assert alpha_second_moment > 1.02  # alpha really varies
    assert abs(measured / predicted - 1) < 0.10, (measured, predicted)
