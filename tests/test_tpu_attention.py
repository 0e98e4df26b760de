"""Splash attention, the decoder's attention on TPU (tpu_attention.py): its numerics in Pallas
interpret mode against the blockwise kernel, and the TPU compiler's program using it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vppo_jax.models import qwen2_5_vl
from vppo_jax.models.qwen2_5_vl import tpu_attention
from vppo_jax.models.qwen2_5_vl.attention import blockwise_causal_attention
from vppo_jax.models.qwen2_5_vl.text import TextModel
from vppo_jax.parallel import sharding
from vppo_jax.parallel.tpu import topology_devices


def random_attention_inputs(batch, queries, keys, padding, seed=0):
    """q (B, Tq, 4, 16) over k, v (B, Tk, 2, 16); row b's first padding[b] keys and, where a row
    has a gap (padding[b] < 0), keys 30..39 are padding (a prompt's left padding, a hole)."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, queries, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(batch, keys, 2, 16)), jnp.float32) for _ in range(2))
    positions = np.arange(keys)[None, :]
    left = np.maximum(np.asarray(padding), 0)[:, None]
    hole = (np.asarray(padding) < 0)[:, None] & (positions >= 30) & (positions < 40)
    return q, k, v, jnp.asarray((positions >= left) & ~hole)


CASES = {
    # (rows, queries, keys, padding per row)
    "self-attention, left padding": (2, 37, 37, [5, 0]),
    "a suffix over a prefix, across 128-token blocks": (2, 90, 300, [7, -1]),
    "one block exactly": (1, 128, 128, [0]),
}


@pytest.mark.parametrize("case", CASES)
def test_splash_matches_the_blockwise_kernel_forward_and_gradients(case):
    rows, queries, keys, padding = CASES[case]
    q, k, v, key_valid = random_attention_inputs(rows, queries, keys, padding)
    real = np.asarray(key_valid[:, keys - queries :])  # a padding query's output is read by no one
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(rows, queries, 64)), jnp.float32) * real[..., None]
    splash = lambda q, k, v: tpu_attention.causal_attention(q, k, v, key_valid, interpret=True)
    blockwise = lambda q, k, v: blockwise_causal_attention(q, k, v, key_valid, 32)

    np.testing.assert_allclose(np.asarray(splash(q, k, v))[real], np.asarray(blockwise(q, k, v))[real], atol=2e-6)
    loss = lambda attend: jax.jit(jax.grad(lambda *a: (attend(*a) * weights).sum(), argnums=(0, 1, 2)))
    for ours, reference in zip(loss(splash)(q, k, v), loss(blockwise)(q, k, v)):
        assert np.all(np.isfinite(np.asarray(ours)))
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=5e-6)


def test_splash_under_a_mesh_splits_rows_and_heads():
    """Rows over data x fsdp and heads over tensor (shard_map): the rows' results unchanged."""
    q, k, v, key_valid = random_attention_inputs(4, 40, 40, [3, 0, 11, 0])
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    attend = lambda q, k, v, m: tpu_attention.causal_attention(q, k, v, m, interpret=True)
    rows = lambda *axes: sharding.named(mesh, "batch", *axes)
    in_shardings = (
        rows(None, "act_heads", None),
        rows(None, "act_kv_heads", None),
        rows(None, "act_kv_heads", None),
        rows(None),
    )
    split = jax.jit(sharding.under_mesh(mesh, attend), in_shardings=in_shardings)(q, k, v, key_valid)
    real = np.asarray(key_valid)
    np.testing.assert_allclose(np.asarray(split)[real], np.asarray(attend(q, k, v, key_valid))[real], atol=1e-6)


# --- the TPU compiler (libtpu): compiling for a TPU topology needs no TPU ---------------


def tpu_devices():
    """The devices of a v5p-8 slice, for compiling only; skips where libtpu is not installed."""
    devices = topology_devices("v5p-8")
    if devices is None:
        pytest.skip("libtpu is not installed (pip install -r requirements-tpu.txt)")
    return devices


def decoder_gradient_hlo(devices, shared_prompt: bool) -> str:
    """The compiled HLO of the test preset decoder's gradient (a full forward, or the shared-prompt
    `response_window`) on a mesh of `devices`, rows over fsdp."""
    config = qwen2_5_vl.preset("test").with_compute(attention_block=64)
    mesh = sharding.make_mesh({"fsdp": -1}, devices)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: TextModel(config, nnx.Rngs(0))), nnx.Param)
    rows, length, hidden = 2 * len(devices), 200, config.text.hidden_size

    def loss(params, embeddings, positions, mask):
        model = nnx.merge(graphdef, params)
        if shared_prompt:
            return model.response_window(embeddings, positions, mask, window=72, shared=2).sum()
        return model(embeddings, positions, mask).sum()

    abstract = lambda shape, dtype, *axes: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.named(mesh, *axes))
    args = (
        jax.tree.map(
            lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
            params,
            sharding.param_shardings(mesh, params),
        ),
        abstract((rows, length, hidden), jnp.float32, "batch", None, None),
        abstract((3, rows, length), jnp.int32, None, "batch", None),
        abstract((rows, length), jnp.bool_, "batch", None),
    )
    return jax.jit(jax.grad(sharding.under_mesh(mesh, loss))).lower(*args).compile().as_text()


@pytest.mark.parametrize("shared_prompt", [False, True], ids=["full forward", "shared prompt"])
def test_the_tpu_program_runs_splash_and_the_cpu_program_does_not(shared_prompt):
    tpu = decoder_gradient_hlo(tpu_devices(), shared_prompt)
    for kernel in ("splash_mha_fwd", "splash_mha_dkv"):
        assert kernel in tpu, f"{kernel} is not in the TPU program"
    cpu = decoder_gradient_hlo(jax.devices("cpu")[:4], shared_prompt)
    assert "splash_mha" not in cpu and "tpu_custom_call" not in cpu
