"""The decoder's blockwise attention, the layers' rematerialisation and the unrolled layer
loop, against the dense attention, the scan and transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vppo_jax.models import qwen2_5_vl
from vppo_jax.models.qwen2_5_vl.attention import blockwise_causal_attention
from vppo_jax.models.qwen2_5_vl.inputs import prepare_inputs
from vppo_jax.models.qwen2_5_vl.layers import attention

from hf_reference import hf_logits, processor_batch, text_ids


def dense_causal(q, k, v, key_valid):
    """The (T, T)-mask attention the port was checked against transformers with."""
    length = q.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))[None] & key_valid[:, None, :]
    return attention(q, k, v, mask)


@pytest.fixture(scope="module")
def qkv():
    """Two sequences of 37 tokens (left-padded by 5 and by 0), 4 query heads over 2 kv heads."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 37, heads, 16)), jnp.float32) for heads in (4, 2, 2))
    key_valid = jnp.asarray(np.arange(37)[None, :] >= np.array([[5], [0]]))
    return q, k, v, key_valid


@pytest.mark.parametrize("block", [8, 16, 37, 64])
def test_blockwise_equals_dense_forward_and_gradients(qkv, block):
    q, k, v, key_valid = qkv
    real = np.asarray(key_valid)  # padding queries attend to nothing: not compared
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, 37, 64)), jnp.float32) * key_valid[..., None]

    def loss(attend, q, k, v):
        return (attend(q, k, v, key_valid) * weights).sum()

    blockwise = lambda q, k, v, valid: blockwise_causal_attention(q, k, v, valid, block)
    np.testing.assert_allclose(
        np.asarray(blockwise(q, k, v, key_valid))[real], np.asarray(dense_causal(q, k, v, key_valid))[real], atol=2e-6
    )
    ours = jax.grad(lambda *a: loss(blockwise, *a), argnums=(0, 1, 2))(q, k, v)
    reference = jax.grad(lambda *a: loss(dense_causal, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, reference):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6)


def test_blockwise_never_forms_the_full_score_matrix():
    """The compiled forward + backward's temporaries stay far below one (T, T) fp32 score array
    per head, which the dense attention needs several of."""
    length, heads = 1024, 4
    q = jax.ShapeDtypeStruct((1, length, heads, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, heads, 16), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, length), jnp.bool_)

    def temporaries(attend):
        grad = jax.grad(lambda q, k, v, m: attend(q, k, v, m).sum(), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, kv, kv, valid).compile().memory_analysis().temp_size_in_bytes

    scores = heads * length * length * 4
    assert temporaries(dense_causal) > 2 * scores
    assert temporaries(lambda q, k, v, m: blockwise_causal_attention(q, k, v, m, 128)) < scores / 2


def test_small_attention_blocks_match_transformers(hf_model, port):
    """The whole port with 16-token attention blocks (every sequence here is longer) against
    transformers' fp32 logits, as the dense port is checked."""
    samples = [(text_ids(40, 1), [(56, 84)]), (text_ids(12, 2), [(112, 56)])]
    batch = processor_batch(samples)
    blocked = qwen2_5_vl.with_config(port, port.config.with_compute(attention_block=16))
    ours = np.asarray(blocked(**batch), np.float32)
    real = batch["attention_mask"].astype(bool)
    assert batch["input_ids"].shape[1] > 16
    assert np.abs(hf_logits(hf_model, batch) - ours)[real].max() <= 1e-4


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients_and_keeps_less(port, remat):
    batch = processor_batch([(text_ids(60, 3), [(112, 112)]), (text_ids(30, 4), [(56, 84)])])
    inputs = prepare_inputs(port.config, **batch)

    def gradient_program(model):
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: (nnx.merge(graphdef, p).hidden_states(inputs).astype(jnp.float32) ** 2).mean()
        return jax.jit(jax.grad(loss)), params

    plain, params = gradient_program(port)
    rematerialised, _ = gradient_program(qwen2_5_vl.with_config(port, port.config.with_compute(remat=remat)))
    for a, b in zip(jax.tree.leaves(plain(params)), jax.tree.leaves(rematerialised(params))):
        # Recomputed activations fuse differently: equal to fp32 rounding (measured <= 2.4e-6 here).
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    kept = lambda program: program.lower(params).compile().memory_analysis().temp_size_in_bytes
    assert kept(rematerialised) < 0.8 * kept(plain)  # remat cannot silently stop working


def test_unrolled_layers_match_transformers_and_the_scan(hf_model, port):
    samples = [(text_ids(40, 1), [(56, 84)]), (text_ids(12, 2), [(112, 56)])]
    batch = processor_batch(samples)
    unrolled = qwen2_5_vl.with_config(port, port.config.with_compute(layer_loop="unroll"))
    real = batch["attention_mask"].astype(bool)
    assert np.abs(hf_logits(hf_model, batch) - np.asarray(unrolled(**batch), np.float32))[real].max() <= 1e-4

    inputs = prepare_inputs(port.config, **batch)
    graphdef, params = nnx.split(port, nnx.Param)
    unrolled_graphdef = nnx.graphdef(unrolled)

    def gradient(graphdef):
        loss = lambda p: (nnx.merge(graphdef, p).hidden_states(inputs).astype(jnp.float32) ** 2).mean()
        return jax.jit(jax.grad(loss))(params)

    for a, b in zip(jax.tree.leaves(gradient(graphdef)), jax.tree.leaves(gradient(unrolled_graphdef))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_compute_choices_are_checked(port):
    with pytest.raises(ValueError, match="model.remat='some'"):
        port.config.with_compute(remat="some")
    with pytest.raises(ValueError, match="model.layer_loop='loop'"):
        port.config.with_compute(layer_loop="loop")
    with pytest.raises(ValueError, match="architecture"):
        qwen2_5_vl.with_config(port, qwen2_5_vl.preset("small"))
