"""The optimizer's precision modes against AdamW in float64 NumPy (written from optax's docs:
decoupled weight decay, bias-corrected moments, eps outside the square root), at the paper's
learning rate on the parameters of a bf16-compute Qwen2.5-VL."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vppo_jax.embedded.tiny_model import tiny_config, train_tokenizer
from vppo_jax.models.qwen2_5_vl import init_model
from vppo_jax.models.qwen2_5_vl.inputs import prepare_inputs
from vppo_jax.trainer.optimizer import make_optimizer

LR, B1, B2, EPS, WEIGHT_DECAY, STEPS = 1e-6, 0.9, 0.999, 1e-8, 0.01, 60


def numpy_adamw(params: list[np.ndarray], grads: list[list[np.ndarray]]) -> list[np.ndarray]:
    """AdamW in float64 over a fixed gradient sequence (no clipping: the gradients' norm is below 1)."""
    params = [p.astype(np.float64) for p in params]
    mu = [np.zeros_like(p) for p in params]
    nu = [np.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            mu[i] = B1 * mu[i] + (1 - B1) * g
            nu[i] = B2 * nu[i] + (1 - B2) * g * g
            update = (mu[i] / (1 - B1**t)) / (np.sqrt(nu[i] / (1 - B2**t)) + EPS)
            params[i] = params[i] - LR * (update + WEIGHT_DECAY * params[i])
    return params


@pytest.fixture(scope="module")
def model_config():
    tokenizer = train_tokenizer(["How many red squares are there? \\boxed{3}"] * 4)
    return dataclasses.replace(tiny_config(tokenizer)).with_dtypes("float32", "bfloat16")


@pytest.fixture(scope="module")
def movement(model_config):
    return measure_movement(model_config)


def measure_movement(model_config):
    """(reference movement, {mode: our movement}, initial weights) over STEPS updates with the
    same gradients, as flat lists of arrays over every parameter of the model."""
    params = nnx.state(init_model(model_config, seed=3), nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    initial = [np.asarray(p, np.float32) for p in leaves]
    rng = np.random.default_rng(0)
    # A steady direction plus as much fresh noise per step; global norm about 0.7, clipping stays off.
    scale = 0.5 / np.sqrt(sum(p.size for p in initial))
    direction = [rng.standard_normal(p.shape) * scale for p in initial]
    grads = [[(d + rng.standard_normal(d.shape) * scale).astype(np.float32) for d in direction] for _ in range(STEPS)]
    expected = [new - old for new, old in zip(numpy_adamw(initial, grads), initial)]
    moved, compensation = {}, None
    for param_dtype in ("float32", "bfloat16"):
        optimizer = make_optimizer(LR, B1, B2, WEIGHT_DECAY, 1.0, param_dtype)
        start = [jnp.asarray(p, param_dtype) for p in initial]
        state_params = jax.tree.unflatten(treedef, start)
        opt_state = optimizer.init(state_params)

        @jax.jit
        def apply(params, opt_state, grads):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        for step_grads in grads:
            state_params, opt_state = apply(state_params, opt_state, jax.tree.unflatten(treedef, step_grads))
        final = jax.tree.leaves(state_params)
        assert all(p.dtype == jnp.dtype(param_dtype) for p in final)
        moved[param_dtype] = [np.asarray(f, np.float64) - np.asarray(s, np.float64) for f, s in zip(final, start)]
        if param_dtype == "bfloat16":
            compensation = [np.asarray(c, np.float64) for c in jax.tree.leaves(opt_state[1].compensation)]
    return expected, moved, compensation, initial


def total(arrays):
    return sum(np.abs(a).sum() for a in arrays)


def test_fp32_master_parameters_follow_float64_adamw_within_rounding(movement):
    expected, moved, _, initial = movement
    for want, got, weights in zip(expected, moved["float32"], initial):
        # One fp32 rounding per step at most, at the largest magnitude the weight can pass
        # (an Adam step is at most a few learning rates).
        largest = (np.abs(weights) + 4 * STEPS * LR).astype(np.float32)
        assert np.all(np.abs(got - want) <= STEPS * np.spacing(largest).astype(np.float64))
    assert abs(total(moved["float32"]) / total(expected) - 1) < 1e-3


def test_bf16_kahan_moves_the_weights_at_least_half_as_far_as_fp32_adamw(movement):
    expected, moved, compensation, initial = movement
    ratio = total(moved["bfloat16"]) / total(expected)
    changed = sum((np.abs(m) > 0).sum() for m in moved["bfloat16"]) / sum(m.size for m in moved["bfloat16"])
    assert ratio >= 0.5, ratio
    assert changed > 0.3, changed
    # What rounding kept back waits in the compensation buffer: weight + buffer follow fp32 AdamW.
    tracked = [m + c for m, c in zip(moved["bfloat16"], compensation)]
    assert abs(total(tracked) / total(expected) - 1) < 0.02


def test_an_unknown_parameter_dtype_is_refused():
    with pytest.raises(ValueError, match="model.param_dtype='float16'; choose one of"):
        make_optimizer(param_dtype="float16")


def test_fp32_master_weights_compute_exactly_what_a_bf16_model_computes(model_config):
    """Weights cast once per use: an fp32-master / bf16-compute model gives the logits of the
    same model stored in bf16, and its activations are bf16."""
    master = init_model(model_config, seed=5)
    graphdef, params = nnx.split(master, nnx.Param)
    bf16_model = init_model(model_config.with_dtypes("bfloat16"), seed=5)
    bf16_graphdef, _ = nnx.split(bf16_model, nnx.Param)
    bf16_model = nnx.merge(bf16_graphdef, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
    ids = np.array([[11, 12, 13, 14, 15, 16]], np.int32)
    inputs = prepare_inputs(model_config, ids, np.ones_like(ids))
    ours = nnx.jit(lambda m, x: m.logits(x))(master, inputs)
    reference = nnx.jit(lambda m, x: m.logits(x))(bf16_model, inputs)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(reference, np.float32))
