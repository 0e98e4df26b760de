"""Token visual dependency estimators (the paper's Definition 3.1) against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vppo_jax.vppo import dependency, logprobs

B, T, D, V = 2, 13, 8, 37
TEMPERATURE = 0.7


def np_log_softmax(hidden, unembedding, temperature):
    logits = hidden.astype(np.float64) @ unembedding.astype(np.float64) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def np_dependency(name, hidden, hidden_perturbed, unembedding, tokens, mask, temperature):
    logp = np_log_softmax(hidden, unembedding, temperature)
    logq = np_log_softmax(hidden_perturbed, unembedding, temperature)
    p, q = np.exp(logp), np.exp(logq)
    if name == "k3":
        sampled_p = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
        sampled_q = np.take_along_axis(logq, tokens[..., None], -1)[..., 0]
        d = np.clip(sampled_q - sampled_p, -20, 20)
        score = np.clip(np.exp(d) - d - 1, 0, 10)
    elif name == "kl":
        score = (p * (logp - logq)).sum(-1)
    elif name == "jsd":
        m = (p + q) / 2
        score = 0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)
    else:
        top1 = p.argmax(-1)[..., None]
        score = (np.take_along_axis(p, top1, -1) - np.take_along_axis(q, top1, -1))[..., 0]
    return np.where(mask, score, 0.0)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    # A perturbation of moderate size, so every estimator sees a non-trivial shift.
    hidden_perturbed = (hidden + 0.7 * rng.normal(size=(B, T, D))).astype(np.float32)
    unembedding = rng.normal(size=(D, V)).astype(np.float32) / np.sqrt(D) * 3
    tokens = rng.integers(0, V, (B, T))
    mask = np.ones((B, T), bool)
    mask[1, 9:] = False  # padding
    return hidden, hidden_perturbed, unembedding, tokens, mask


@pytest.mark.parametrize("name", ["k3", "kl", "jsd", "top1_drop"])
@pytest.mark.parametrize("chunk_size", [4, 13, 32])
def test_estimators_match_unchunked_numpy(inputs, name, chunk_size):
    expected = np_dependency(name, *inputs, TEMPERATURE)
    fn = jax.jit(dependency.token_dependency, static_argnames=("name", "chunk_size"))
    scores = fn(
        name=name,
        hidden=inputs[0],
        hidden_perturbed=inputs[1],
        unembedding=inputs[2],
        tokens=inputs[3],
        mask=inputs[4],
        temperature=TEMPERATURE,
        chunk_size=chunk_size,
    )
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=2e-5, atol=2e-6)
    assert np.all(np.asarray(scores)[~inputs[4]] == 0.0)


def test_named_estimators_are_the_dispatcher(inputs):
    np.testing.assert_array_equal(
        np.asarray(dependency.kl(*inputs, TEMPERATURE, 4)),
        np.asarray(dependency.token_dependency("kl", *inputs, TEMPERATURE, 4)),
    )


def test_identical_images_give_zero_dependency(inputs):
    hidden, _, unembedding, tokens, mask = inputs
    for name in dependency.ESTIMATORS:
        scores = dependency.token_dependency(name, hidden, hidden, unembedding, tokens, mask)
        np.testing.assert_allclose(np.asarray(scores), 0.0, atol=1e-6)


def test_mean_of_k3_converges_to_exact_kl():
    """k3 is unbiased for KL(p || p') when o_t ~ p (paper Definition 3.1)."""
    rng = np.random.default_rng(1)
    samples, small_vocab = 20000, 6
    unembedding = rng.normal(size=(D, small_vocab)).astype(np.float32)
    h = rng.normal(size=(D,)).astype(np.float32) * 0.5
    h_perturbed = h + 0.3 * rng.normal(size=(D,)).astype(np.float32)
    logp = np_log_softmax(h[None], unembedding, 1.0)[0]
    logq = np_log_softmax(h_perturbed[None], unembedding, 1.0)[0]
    exact_kl = float((np.exp(logp) * (logp - logq)).sum())
    tokens = rng.choice(small_vocab, size=(1, samples), p=np.exp(logp))
    k3_np = np.exp(logq[tokens] - logp[tokens]) - (logq[tokens] - logp[tokens]) - 1

    hidden = np.broadcast_to(h, (1, samples, D))
    hidden_perturbed = np.broadcast_to(h_perturbed, (1, samples, D))
    k3 = np.asarray(
        dependency.k3(hidden, hidden_perturbed, unembedding, tokens, np.ones((1, samples), bool), chunk_size=2048)
    )
    np.testing.assert_allclose(k3, k3_np, rtol=1e-4, atol=1e-6)
    standard_error = k3.std() / np.sqrt(samples)
    assert exact_kl > 20 * standard_error  # the check below is not trivially satisfied
    assert abs(k3.mean() - exact_kl) < 4 * standard_error


def test_token_logprobs_and_entropy_values_and_gradients(inputs):
    hidden, _, unembedding, tokens, _ = inputs
    logp = np_log_softmax(hidden, unembedding, TEMPERATURE)
    p = np.exp(logp)
    entropy = -(p * logp).sum(-1)
    sampled = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]

    # d/dlogits of sum_t [logp_t(o_t) + H_t]: (onehot - p) + (-p (log p + H)).
    onehot = np.eye(V)[tokens]
    dlogits = (onehot - p) - p * (logp + entropy[..., None])
    grad_hidden = dlogits @ unembedding.T.astype(np.float64) / TEMPERATURE
    grad_unembedding = np.einsum("btd,btv->dv", hidden.astype(np.float64), dlogits) / TEMPERATURE

    def summed(h, w):
        lp, ent = logprobs.token_logprobs_and_entropy(h, w, tokens, TEMPERATURE, chunk_size=4)
        return lp.sum() + ent.sum(), (lp, ent)

    (_, (lp, ent)), grads = jax.jit(jax.value_and_grad(summed, argnums=(0, 1), has_aux=True))(hidden, unembedding)
    np.testing.assert_allclose(np.asarray(lp), sampled, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), entropy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[0]), grad_hidden, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[1]), grad_unembedding, rtol=1e-4, atol=1e-5)


def test_bf16_inputs_accumulate_in_fp32(inputs):
    hidden, hidden_perturbed, unembedding, tokens, mask = inputs
    as_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (hidden, hidden_perturbed, unembedding)]
    rounded = [np.asarray(x.astype(jnp.float32)) for x in as_bf16]
    scores = dependency.kl(*as_bf16, tokens, mask, TEMPERATURE, 4)
    assert scores.dtype == jnp.float32
    expected = np_dependency("kl", *rounded, tokens, mask, TEMPERATURE)
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-4, atol=1e-5)


def test_the_scoring_pass_statistics_come_with_the_dependency(inputs):
    """scores_with_dependency: pi_old's log-probs and entropy beside the dependency, from the
    same pass over the vocabulary, each against float64 NumPy."""
    hidden, _, unembedding, tokens, mask = inputs
    logp = np_log_softmax(hidden, unembedding, TEMPERATURE)
    entropy = -(np.exp(logp) * logp).sum(-1)
    sampled = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    fn = jax.jit(dependency.scores_with_dependency, static_argnames=("name", "chunk_size"))
    got_logp, got_entropy, got_dependency = fn("kl", *inputs, TEMPERATURE, chunk_size=4)
    np.testing.assert_allclose(np.asarray(got_logp), sampled, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_entropy), entropy, rtol=1e-5, atol=1e-5)
    expected = np_dependency("kl", *inputs, TEMPERATURE)
    np.testing.assert_allclose(np.asarray(got_dependency), expected, rtol=2e-5, atol=2e-6)
