"""Sharded runs on 8 fake CPU devices against the same computation on one device.

The reference is the one-device run (no sharding at all); each mesh (data, fsdp, tensor)
must give the same forward logits, the same greedy tokens and the same train step
(parameters after the update and metrics) within 1e-5 in fp32.
"""
import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vppo_jax.rollout import sampling
from vppo_jax.parallel import sharding
from vppo_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, TextConfig, VisionConfig, init_model
from vppo_jax.models.qwen2_5_vl.inputs import prepare_inputs
from vppo_jax.trainer.optimizer import make_optimizer
from vppo_jax.vppo import step as step_lib
from vppo_jax.vppo.batch import build_train_batch

MESHES = [(2, 2, 2), (1, 8, 1), (1, 4, 2)]
IMAGE, VISION_START, VISION_END = 1000, 1001, 1002
GROUP = 4


def tiny_config() -> Qwen2_5_VLConfig:
    """Every sharded dimension divides 8 (model 64, 4 heads of 16, 2 kv heads, MLP 128, vocab 1024)."""
    return Qwen2_5_VLConfig(
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                            fullatt_block_indexes=(1,)),
        text=TextConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                        mrope_section=(2, 3, 3)),
        tie_word_embeddings=False, image_token_id=IMAGE, video_token_id=1003, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )


@pytest.fixture(scope="module")
def model():
    """A random model with every parameter (norms and biases too) perturbed, on one device."""
    model = init_model(tiny_config(), seed=3)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def mesh_of(shape) -> jax.sharding.Mesh:
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))


def prompts(count: int, seed: int = 0) -> dict:
    """HF-processor-style arrays: text, one image (grids differ per row), text; left-padded."""
    config, rng = tiny_config(), np.random.default_rng(seed)
    grids = [(1, 4 + 2 * (i % 3), 6 + 2 * (i % 2)) for i in range(count)]
    rows = []
    for (t, h, w) in grids:
        rows.append([*rng.integers(3, 900, rng.integers(2, 6)), VISION_START, *[IMAGE] * (t * h * w // 4),
                     VISION_END, *rng.integers(3, 900, rng.integers(3, 9))])
    length = max(map(len, rows))
    input_ids = np.zeros((count, length), np.int32)
    attention_mask = np.zeros((count, length), np.int32)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):], attention_mask[i, length - len(row):] = row, 1
    pixels = rng.standard_normal((sum(np.prod(g) for g in grids), config.vision.patch_dim)).astype(np.float32)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels,
                image_grid_thw=np.asarray(grids), mm_token_type_ids=(input_ids == IMAGE).astype(np.int32))


def forward_logits(model, inputs, mesh) -> np.ndarray:
    graphdef, state = nnx.split(model)
    logits = jax.jit(
        sharding.under_mesh(mesh, lambda s, x: nnx.merge(graphdef, s).logits(x)),
        in_shardings=(sharding.param_shardings(mesh, state), sharding.inputs_shardings(mesh, inputs)),
    )
    params = sharding.put(state, sharding.param_shardings(mesh, state))
    out = logits(params, sharding.put(inputs, sharding.inputs_shardings(mesh, inputs)))
    assert len(out.sharding.device_set) == mesh.size
    return np.asarray(out)


def greedy(model, mesh):
    """12 greedy tokens for 4 prompts: on (1, 8, 1) padded to 8 with empty prompts, dropped after."""
    params = sampling.SamplingParams(max_new_tokens=12, temperature=0.0, end_token_ids=(), pad_token_id=0)
    rollout = sampling.generate(model, prompts(4), jax.random.split(jax.random.key(0), 4), params, mesh)
    return np.asarray(rollout.tokens), np.asarray(rollout.logprobs)


def train_batch(model):
    """Two groups of 4 rows: prompt + response, GRPO-like advantages."""
    arrays = prompts(8, seed=1)
    rng = np.random.default_rng(2)
    response = rng.integers(3, 900, (8, 6))
    response_tokens = np.zeros((8, arrays["input_ids"].shape[1] + 6), bool)
    response_tokens[:, -6:] = rng.random((8, 6)) < 0.9
    input_ids = np.concatenate([arrays["input_ids"], response], 1)
    attention_mask = np.concatenate([arrays["attention_mask"], np.ones_like(response)], 1)
    return build_train_batch(model.config, input_ids, attention_mask, response_tokens,
                             rng.standard_normal(8).astype(np.float32), arrays["pixel_values"],
                             arrays["image_grid_thw"])


def one_step(model, mesh):
    # Clipping and SGD with momentum (its state mirrors the parameters, like Adam's), not
    # AdamW: Adam's first update is lr * g / (|g| + eps), which turns rounding noise in
    # gradients that are nearly zero by construction (key biases: softmax ignores a shift)
    # into parameter differences up to lr. An update linear in g compares at 1e-5.
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    graphdef, state = step_lib.init_state(model, optimizer)
    state = jax.tree.map(jnp.array, state)  # the step donates its state; keep the model's arrays
    step = step_lib.make_train_step(step_lib.StepConfig(group_size=GROUP), optimizer, graphdef, mesh)
    state, metrics = step(state, train_batch(model), jax.random.key(5))
    embed = state.params["language_model"]["embed_tokens"]
    assert len(embed.sharding.device_set) == mesh.size
    assert state.opt_state[1][0].trace["language_model"]["embed_tokens"].sharding == embed.sharding
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def runs(model):
    """{(what, mesh shape or None for one device): result} for every run the tests compare.

    XLA:CPU compiles one program on one core: two at a time halve the wait on two cores.
    """
    inputs = prepare_inputs(model.config, **prompts(8))
    jobs = {(name, shape): (function, mesh_of(shape) if shape else sharding.single_device_mesh())
            for name, function in (("forward", lambda m: forward_logits(model, inputs, m)),
                                   ("greedy", lambda m: greedy(model, m)), ("step", lambda m: one_step(model, m)))
            for shape in [None, *MESHES]}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {key: pool.submit(function, mesh) for key, (function, mesh) in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_forward_logits_match_one_device(runs, shape):
    np.testing.assert_allclose(runs["forward", shape], runs["forward", None], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_greedy_tokens_match_one_device(runs, shape):
    (tokens, logprobs), (ref_tokens, ref_logprobs) = runs["greedy", shape], runs["greedy", None]
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(logprobs, ref_logprobs, atol=1e-5)
    assert len(np.unique(ref_tokens)) > 4  # not one repeated token: the comparison sees real decoding


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_train_step_matches_one_device(model, runs, shape):
    (params, metrics), (ref_params, ref_metrics) = runs["step", shape], runs["step", None]
    assert ref_metrics["grad_norm"] > 0 and not ref_metrics["skipped"]
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[name], value, atol=1e-5, rtol=1e-5, err_msg=name)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), jax.device_get(nnx.split(model)[1]), ref_params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the update is visible at this tolerance
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), params, ref_params)


# --- the rules and the mesh -----------------------------------------------------------


def test_parameters_are_split_by_the_rules(model):
    mesh = mesh_of((1, 4, 2))
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(mesh, nnx.split(model)[1]))
    text = specs["language_model"]
    assert text["embed_tokens"] == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert text["layers"]["self_attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert text["layers"]["mlp"]["down_proj"]["kernel"] == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    assert text["norm"]["weight"] == jax.sharding.PartitionSpec(None)
    assert specs["lm_head"] == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_an_indivisible_dimension_keeps_the_mesh_axes_that_divide_it():
    P = jax.sharding.PartitionSpec
    # 3420 (the 7B vision MLP) over tensor=8 does not divide: that axis stays whole.
    assert sharding.logical_spec(("mlp", "embed"), mesh_of((1, 1, 8)), (3420, 1280)) == P(None, "fsdp")
    # 6 rows over data x fsdp = 2 x 4: split over data only.
    assert sharding.logical_spec(("batch", None), mesh_of((2, 4, 1)), (6, 5)) == P("data", None)


def test_a_collision_is_refused_with_the_parameter_named(monkeypatch):
    monkeypatch.setitem(sharding.RULES, "vocab", "fsdp")
    with pytest.raises(ValueError, match=r"lm_head: logical axes \('embed', 'vocab'\) map mesh axis 'fsdp' twice"):
        sharding.param_shardings(mesh_of((1, 8, 1)), {"lm_head": jax.ShapeDtypeStruct((64, 1024), jnp.float32)})


def test_unknown_parameters_and_bad_meshes_are_refused():
    with pytest.raises(KeyError, match="parameter visual/new_thing/kernel: no entry in sharding.PARAM_AXES"):
        sharding.param_axes("visual/new_thing/kernel", 2)
    with pytest.raises(ValueError, match=r"needs 12 devices, but there are 8"):
        sharding.make_mesh({"data": 3, "fsdp": 4})
    with pytest.raises(ValueError, match="8 devices do not split into groups of 3"):
        sharding.make_mesh({"data": -1, "tensor": 3})
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.make_mesh({"model": 8})
    assert sharding.make_mesh({"data": -1, "tensor": 2}).shape == {"data": 4, "fsdp": 1, "tensor": 2}


def test_a_batch_the_mesh_does_not_divide_is_refused(model):
    optimizer = make_optimizer(1e-3)
    graphdef, state = step_lib.init_state(model, optimizer)
    step = step_lib.make_train_step(step_lib.StepConfig(group_size=GROUP), optimizer, graphdef, mesh_of((1, 8, 1)))
    arrays = prompts(4)
    ids = arrays["input_ids"]
    batch = build_train_batch(model.config, ids, arrays["attention_mask"], np.ones_like(ids, bool),
                              np.zeros(4, np.float32), arrays["pixel_values"], arrays["image_grid_thw"])
    with pytest.raises(ValueError, match=r"4 rows do not split over the mesh's 8 batch shards"):
        step(state, batch, jax.random.key(0))
