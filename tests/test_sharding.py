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

from vppo_jax.errors import InputError
from vppo_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, abstract_model, init_model, preset
from vppo_jax.models.qwen2_5_vl.inputs import prepare_inputs
from vppo_jax.parallel import sharding
from vppo_jax.rollout import sampling
from vppo_jax.trainer.optimizer import make_optimizer
from vppo_jax.vppo.batch import build_train_batch, init_state
from vppo_jax.vppo.programs import make_train_step
from vppo_jax.vppo.step import StepConfig

MESHES = [(2, 2, 2), (1, 8, 1), (1, 4, 2)]
GROUP = 4
P = jax.sharding.PartitionSpec


def tiny_config() -> Qwen2_5_VLConfig:
    """Every sharded dimension divides 8 (model 64, 4 heads of 16, 2 kv heads, MLP 128, vocab 1024)."""
    return preset("test")


IMAGE, VISION_START, VISION_END = (
    getattr(tiny_config(), f) for f in ("image_token_id", "vision_start_token_id", "vision_end_token_id")
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
    for t, h, w in grids:
        rows.append(
            [
                *rng.integers(3, 900, rng.integers(2, 6)),
                VISION_START,
                *[IMAGE] * (t * h * w // 4),
                VISION_END,
                *rng.integers(3, 900, rng.integers(3, 9)),
            ]
        )
    length = max(map(len, rows))
    input_ids = np.zeros((count, length), np.int32)
    attention_mask = np.zeros((count, length), np.int32)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :], attention_mask[i, length - len(row) :] = row, 1
    pixels = rng.standard_normal((sum(np.prod(g) for g in grids), config.vision.patch_dim)).astype(np.float32)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixels,
        image_grid_thw=np.asarray(grids),
        mm_token_type_ids=(input_ids == IMAGE).astype(np.int32),
    )


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
    return build_train_batch(
        model.config,
        input_ids,
        attention_mask,
        response_tokens,
        rng.standard_normal(8).astype(np.float32),
        arrays["pixel_values"],
        arrays["image_grid_thw"],
    )


def one_step(model, mesh):
    # Clipping and SGD with momentum (its state mirrors the parameters, like Adam's), not
    # AdamW: Adam's first update is lr * g / (|g| + eps), which turns rounding noise in
    # gradients that are nearly zero by construction (key biases: softmax ignores a shift)
    # into parameter differences up to lr. An update linear in g compares at 1e-5.
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    graphdef, state = init_state(model, optimizer)
    state = jax.tree.map(jnp.array, state)  # the step donates its state; keep the model's arrays
    step = make_train_step(StepConfig(group_size=GROUP), optimizer, graphdef, mesh)
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
    jobs = {
        (name, shape): (function, mesh_of(shape) if shape else sharding.single_device_mesh())
        for name, function in (
            ("forward", lambda m: forward_logits(model, inputs, m)),
            ("greedy", lambda m: greedy(model, m)),
            ("step", lambda m: one_step(model, m)),
        )
        for shape in [None, *MESHES]
    }
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


def abstract_param(shape, axes=None) -> nnx.Param:
    metadata = {} if axes is None else dict(out_sharding=axes, eager_sharding=False)
    return nnx.Param(jax.ShapeDtypeStruct(shape, jnp.float32), **metadata)


def test_a_collision_is_refused_with_the_parameter_named(monkeypatch):
    monkeypatch.setitem(sharding.RULES, "vocab", "fsdp")
    with pytest.raises(ValueError, match=r"lm_head: logical axes \('embed', 'vocab'\) map mesh axis 'fsdp' twice"):
        sharding.param_shardings(mesh_of((1, 8, 1)), {"lm_head": abstract_param((64, 1024), ("embed", "vocab"))})


def test_parameters_without_logical_axes_are_refused_with_their_path():
    mesh = mesh_of((1, 4, 2))
    with pytest.raises(ValueError, match=r"parameter visual/new_thing/kernel: no logical axes \(Param without"):
        sharding.param_shardings(mesh, {"visual": {"new_thing": {"kernel": abstract_param((4, 4))}}})
    with pytest.raises(ValueError, match=r"parameter visual/bare: no logical axes \(a bare ShapeDtypeStruct"):
        sharding.param_shardings(mesh, {"visual": {"bare": jax.ShapeDtypeStruct((4, 4), jnp.float32)}})
    with pytest.raises(ValueError, match=r"parameter w has 2 axes but its out_sharding metadata names 1"):
        sharding.param_shardings(mesh, {"w": abstract_param((4, 4), ("embed",))})


def test_the_logical_axes_survive_jit_donation_and_eval_shape(model):
    """param_shardings reads the axes from the tree's static part: any state of the model will do."""
    mesh = mesh_of((1, 4, 2))
    state = nnx.split(model, nnx.Param)[1]
    expected = jax.tree.map(lambda s: s.spec, sharding.param_shardings(mesh, state))
    donated = jax.jit(lambda s: jax.tree.map(lambda a: a * 2, s), donate_argnums=0)(jax.tree.map(jnp.copy, state))
    for tree in (donated, jax.eval_shape(lambda s: s, state), jax.device_get(state)):
        assert jax.tree.map(lambda s: s.spec, sharding.param_shardings(mesh, tree)) == expected


def test_unknown_parameters_and_bad_meshes_are_refused():
    with pytest.raises(ValueError, match=r"needs 12 devices, but there are 8"):
        sharding.make_mesh({"data": 3, "fsdp": 4})
    with pytest.raises(ValueError, match="8 devices do not split into groups of 3"):
        sharding.make_mesh({"data": -1, "tensor": 3})
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.make_mesh({"model": 8})
    assert sharding.make_mesh({"data": -1, "tensor": 2}).shape == {"data": 4, "fsdp": 1, "tensor": 2}


def test_a_batch_the_mesh_does_not_divide_is_refused(model):
    optimizer = make_optimizer(1e-3)
    graphdef, state = init_state(model, optimizer)
    step = make_train_step(StepConfig(group_size=GROUP), optimizer, graphdef, mesh_of((1, 8, 1)))
    arrays = prompts(4)
    ids = arrays["input_ids"]
    batch = build_train_batch(
        model.config,
        ids,
        arrays["attention_mask"],
        np.ones_like(ids, bool),
        np.zeros(4, np.float32),
        arrays["pixel_values"],
        arrays["image_grid_thw"],
    )
    with pytest.raises(ValueError, match=r"4 rows do not split over the mesh's 8 batch shards"):
        step(state, batch, jax.random.key(0))


# --- the released sizes ---------------------------------------------------------------

# Written out here, independently of the model code: the mesh placement of representative
# parameters of the 7B and 32B on (data, fsdp, tensor) meshes. Model dim over fsdp; heads, MLP
# units and vocabulary over tensor; stacked layers, norms and biases over the model dim whole.
RELEASED_SHARDINGS = {
    ("7b", (1, 4, 2)): {
        "language_model/embed_tokens": ((152064, 3584), P("tensor", "fsdp")),
        "lm_head": ((3584, 152064), P("fsdp", "tensor")),
        "language_model/layers/self_attn/q_proj/kernel": ((28, 3584, 3584), P(None, "fsdp", "tensor")),
        "language_model/layers/self_attn/q_proj/bias": ((28, 3584), P(None, "tensor")),
        "language_model/layers/self_attn/k_proj/kernel": ((28, 3584, 512), P(None, "fsdp", "tensor")),
        "language_model/layers/self_attn/v_proj/bias": ((28, 512), P(None, "tensor")),
        "language_model/layers/self_attn/o_proj/kernel": ((28, 3584, 3584), P(None, "tensor", "fsdp")),
        "language_model/layers/mlp/gate_proj/kernel": ((28, 3584, 18944), P(None, "fsdp", "tensor")),
        "language_model/layers/mlp/down_proj/kernel": ((28, 18944, 3584), P(None, "tensor", "fsdp")),
        "language_model/layers/input_layernorm/weight": ((28, 3584), P(None, None)),
        "language_model/norm/weight": ((3584,), P(None)),
        "visual/patch_embed/kernel": ((1176, 1280), P(None, "fsdp")),
        "visual/blocks/attn/qkv/kernel": ((32, 1280, 3840), P(None, "fsdp", "tensor")),
        "visual/blocks/attn/qkv/bias": ((32, 3840), P(None, "tensor")),
        "visual/blocks/attn/proj/kernel": ((32, 1280, 1280), P(None, "tensor", "fsdp")),
        "visual/blocks/attn/proj/bias": ((32, 1280), P(None, None)),
        "visual/blocks/mlp/up_proj/bias": ((32, 3420), P(None, "tensor")),
        "visual/blocks/mlp/down_proj/kernel": ((32, 3420, 1280), P(None, "tensor", "fsdp")),
        "visual/blocks/mlp/down_proj/bias": ((32, 1280), P(None, None)),
        "visual/blocks/norm1/weight": ((32, 1280), P(None, None)),
        "visual/merger/ln_q/weight": ((1280,), P(None)),
        "visual/merger/fc1/kernel": ((5120, 5120), P("fsdp", "tensor")),
        "visual/merger/fc1/bias": ((5120,), P("tensor")),
        "visual/merger/fc2/kernel": ((5120, 3584), P("tensor", "fsdp")),
        "visual/merger/fc2/bias": ((3584,), P(None)),
    },
    ("32b", (1, 1, 8)): {
        "language_model/embed_tokens": ((152064, 5120), P("tensor", "fsdp")),
        "language_model/layers/self_attn/q_proj/kernel": ((64, 5120, 5120), P(None, "fsdp", "tensor")),
        "language_model/layers/self_attn/k_proj/kernel": ((64, 5120, 1024), P(None, "fsdp", "tensor")),
        "language_model/layers/mlp/up_proj/kernel": ((64, 5120, 27648), P(None, "fsdp", "tensor")),
        # 3420 vision MLP units do not split 8 ways: whole.
        "visual/blocks/mlp/gate_proj/kernel": ((32, 1280, 3420), P(None, "fsdp", None)),
        "visual/blocks/mlp/gate_proj/bias": ((32, 3420), P(None, None)),
        "visual/merger/fc2/kernel": ((5120, 5120), P("tensor", "fsdp")),
    },
}


@pytest.mark.parametrize("name,shape", list(RELEASED_SHARDINGS), ids=str)
def test_released_sizes_carry_logical_axes_and_shard_as_written_here(name, shape):
    mesh = mesh_of(shape)
    params = nnx.split(abstract_model(preset(name)), nnx.Param)[1]  # ShapeDtypeStructs: nothing allocated
    flat = {"/".join(map(str, path)): param for path, param in nnx.to_flat_state(params)}
    assert len(flat) == 33  # 19 text (lm_head untied), 14 vision
    for path, param in flat.items():
        axes = param.get_metadata("out_sharding")
        assert len(axes) == len(param.get_value().shape), path
        assert set(axes) <= set(sharding.RULES) | {None}, path
        assert (axes[0] == "layers") == path.startswith(("language_model/layers/", "visual/blocks/")), path
    shardings = {
        "/".join(map(str, path)): s.get_value() for path, s in nnx.to_flat_state(sharding.param_shardings(mesh, params))
    }
    for path, (param_shape, spec) in RELEASED_SHARDINGS[name, shape].items():
        assert flat[path].get_value().shape == param_shape, path
        assert shardings[path] == jax.sharding.NamedSharding(mesh, spec), path


def test_the_7b_preset_has_the_released_parameter_count():
    """8,292,166,656: Qwen2.5-VL-7B's safetensors (16,584,333,312 bytes in bf16)."""
    params = nnx.split(abstract_model(preset("7b")), nnx.Param)[1]
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)) == 8_292_166_656


def test_optimizer_state_leaves_the_devices_only_where_host_memory_is_separate():
    # On a CPU the devices' memory is host memory: moving the optimizer state would only copy it.
    mesh = sharding.make_mesh({"data": -1})
    assert not sharding.can_offload_to_host(mesh)
    assert sharding.host_memory_is_separate("tpu") and sharding.host_memory_is_separate("gpu")
    # The move itself (what the trainer does on TPU/GPU) keeps the split and the values.
    state = jax.device_put(np.arange(16.0).reshape(8, 2), sharding.named(mesh, "batch", None))
    there = jax.device_put(state, sharding.on_host(state.sharding))
    back = jax.device_put(there, state.sharding)
    assert there.sharding.memory_kind == "pinned_host" and back.sharding == state.sharding
    np.testing.assert_array_equal(back, np.arange(16.0).reshape(8, 2))


@pytest.fixture
def default_rules():
    """Puts the default table back after a test that overrides it."""
    yield
    sharding.use_rules(())


def test_config_sharding_rules_override_the_default_table(default_rules):
    mesh = mesh_of((1, 4, 2))
    weight = {"w": abstract_param((64, 1024), ("embed", "vocab"))}
    assert sharding.param_shardings(mesh, weight)["w"].spec == P("fsdp", "tensor")
    sharding.use_rules((("embed", ("fsdp", "tensor")), ("vocab", None)))
    assert sharding.param_shardings(mesh, weight)["w"].spec == P(("fsdp", "tensor"), None)
    sharding.use_rules([["embed", None]])  # as read back from a run's config.json
    assert sharding.param_shardings(mesh, weight)["w"].spec == P(None, "tensor")  # vocab's default again
    sharding.use_rules(())
    assert sharding.RULES == sharding.DEFAULT_RULES


def test_bad_sharding_rules_are_one_line_input_errors(default_rules):
    with pytest.raises(InputError, match=r"no logical axis 'embedding'; the axes are \["):
        sharding.use_rules((("embedding", "fsdp"),))
    with pytest.raises(InputError, match=r"'embed' -> \['model'\]: not mesh axes"):
        sharding.use_rules((("embed", ("fsdp", "model")),))
    with pytest.raises(InputError, match=r"'embed' is not a \(logical axis, mesh axes\) pair"):
        sharding.use_rules(("embed",))
    assert sharding.RULES == sharding.DEFAULT_RULES  # a refused table changes nothing
