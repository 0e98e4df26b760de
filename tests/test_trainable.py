"""What trains: model.freeze_vision (the vision tower fixed, no optimizer state for it) and LoRA
on the decoder's linear layers (checked against an update of explicit low-rank factors)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_vppo_step import GROUP, setup, train_batch  # noqa: F401 (setup: the fixture)

from vppo_jax.errors import InputError
from vppo_jax.models import qwen2_5_vl
from vppo_jax.models.qwen2_5_vl import lora
from vppo_jax.trainer import config as config_lib
from vppo_jax.trainer.optimizer import make_optimizer
from vppo_jax.vppo import programs
from vppo_jax.vppo import step as step_lib
from vppo_jax.vppo.batch import init_state

LORA = lora.LoRAConfig(rank=3, alpha=6.0, targets=("q_proj", "v_proj", "down_proj"))


def config(**model):
    c = config_lib.default_config()
    c.model.update(model)
    return c


def copy_of(model):
    """The model on copies of its arrays: a state takes its arrays, and a step donates them."""
    return nnx.merge(*nnx.split(jax.tree.map(jnp.array, model)))


def paths_of(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_freeze_vision_trains_the_decoder_alone(setup):  # noqa: F811
    _, model, arrays, response = setup
    optimizer = make_optimizer(1e-3)
    graphdef, state = init_state(copy_of(model), optimizer, config_lib.trainable(config(freeze_vision=True)))
    assert paths_of(state.frozen) and all("'visual'" in p for p in paths_of(state.frozen))
    assert not any("'visual'" in p for p in paths_of(state.params) + paths_of(state.opt_state))
    # Adam's two moments of every trained parameter, and nothing else but its step count.
    moments = [a for a in jax.tree.leaves(state.opt_state) if a.ndim]
    assert len(moments) == 2 * len(jax.tree.leaves(state.params))

    # VPPO in-pass: the perturbed forward runs through the frozen tower (the dependency is there).
    train_step = programs.make_train_step(step_lib.StepConfig(group_size=GROUP), optimizer, graphdef)
    for i in range(2):
        state, metrics = train_step(state, train_batch(model, arrays, response), jax.random.key(i))
    assert metrics["dependency/token_max"] > 0
    before = nnx.state(model, nnx.Param)
    for path, (old, new) in zip(
        paths_of(before["visual"]), zip(jax.tree.leaves(before["visual"]), jax.tree.leaves(state.frozen["visual"]))
    ):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old), err_msg=path)
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(before["language_model"]), jax.tree.leaves(state.params["language_model"]))
    ]
    assert all(moved), moved


def test_frozen_parameters_are_held_in_the_compute_dtype(setup):  # noqa: F811
    _, model, _, _ = setup
    bf16 = qwen2_5_vl.with_config(model, model.config.with_precision("bfloat16", "float32"))
    _, state = init_state(copy_of(bf16), optax.sgd(0.0), config_lib.trainable(config(freeze_vision=True)))
    assert {a.dtype for a in jax.tree.leaves(state.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}


def test_lora_update_is_the_update_of_explicit_low_rank_factors(setup):  # noqa: F811
    """The gradient a LoRA step gives A and B (SGD with step -1: the update is the gradient) is
    the chain rule through W + s A B of the full-weight gradient G of the merged model:
    dA = s G B^T, dB = s A^T G (per layer); the base weights do not move."""
    _, model, arrays, response = setup
    adapted = lora.add_adapters(copy_of(model), LORA, seed=1)
    linears = lora.decoder_linears(adapted)
    for i, name in enumerate(LORA.targets):  # B nonzero (it starts at zero), so that A has a gradient too
        b = linears[name].lora.lora_b
        b[...] = 0.05 * jax.random.normal(jax.random.key(i), b.shape)
    factors = {
        n: (np.asarray(linears[n].lora.lora_a[...]), np.asarray(linears[n].lora.lora_b[...])) for n in LORA.targets
    }
    merged = copy_of(model)
    for name, (a, b) in factors.items():
        kernel = lora.decoder_linears(merged)[name].kernel
        kernel[...] = jnp.asarray(lora.merged_kernel(np.asarray(kernel[...]), a, b, LORA.scale))

    step_config = step_lib.StepConfig(group_size=GROUP, vppo=False)
    batch, key = train_batch(model, arrays, response), jax.random.key(0)
    sgd = optax.sgd(-1.0)  # parameters + gradient

    def step(model, trainable):
        graphdef, state = init_state(model, sgd, trainable)
        before = jax.tree.map(np.asarray, state.params)
        after, metrics = programs.make_train_step(step_config, sgd, graphdef)(state, batch, key)
        return jax.tree.map(lambda new, old: np.asarray(new) - old, after.params, before), after, metrics

    full_grads, _, full_metrics = step(merged, nnx.Param)
    lora_grads, lora_state, lora_metrics = step(adapted, nnx.LoRAParam)
    assert float(lora_metrics["loss"]) == pytest.approx(float(full_metrics["loss"]), rel=1e-5)
    assert not any("lora" in p for p in paths_of(lora_state.frozen))
    assert all("lora" in p for p in paths_of(lora_state.params) + paths_of(lora_state.opt_state))
    for name, (a, b) in factors.items():
        g = lora.decoder_linears(nnx.merge(nnx.graphdef(merged), full_grads))[name].kernel[...]
        ours = lora.decoder_linears(nnx.merge(nnx.graphdef(adapted), lora_grads, lora_state.frozen))[name].lora
        expected_a = LORA.scale * np.matmul(g, b.transpose(0, 2, 1))
        expected_b = LORA.scale * np.matmul(a.transpose(0, 2, 1), g)
        assert np.abs(expected_a).max() > 0 and np.abs(expected_b).max() > 0
        for got, expected in ((ours.lora_a[...], expected_a), (ours.lora_b[...], expected_b)):
            np.testing.assert_allclose(
                np.asarray(got), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=name
            )
    base = nnx.state(model, nnx.Param)["language_model"]
    for old, new in zip(jax.tree.leaves(base), jax.tree.leaves(lora_state.frozen["language_model"])):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_a_lora_target_that_is_not_a_decoder_linear_is_refused():
    c = config(lora=dict(rank=4, alpha=8.0, targets=("q_proj", "fc1")))
    with pytest.raises(InputError, match=r"\['fc1'\] is not a linear layer of the decoder; choose among"):
        config_lib.check_names(c)
