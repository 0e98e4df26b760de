"""The `test` model's four programs compiled by the TPU compiler for a v5p-8 slice (2 x 2 x 1
chips), on this machine without a TPU: libtpu makes the topology's devices for compiling only
(vppo_jax/parallel/tpu.py). A program that stops compiling for TPU fails here, not on a pod."""

import jax
import pytest

from configs import tiny
from vppo_jax.parallel import hlo_cost, sharding, tpu
from vppo_jax.plan import model_config, plan

pytestmark = pytest.mark.skipif(
    tpu.libtpu_version() is None, reason="libtpu is not installed (pip install -r requirements-test.txt)"
)


def test_the_four_programs_compile_for_tpu():
    devices = tpu.topology_devices("v5p-8")
    assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
    config = tiny.get_config()
    config.model.dtype = "bfloat16"
    # Two updates per rollout: the scoring pass (pi_old and the dependency) runs as its own program.
    config.rollout.prompts_per_step, config.rollout.group_size, config.rollout.max_new_tokens = 4, 4, 8
    config.train.updates_per_rollout = 2
    # Padded rows: the packed update's tree attention has loops bounded by data, for which the
    # compiler gives no optimal_seconds (it compiles: cycles and FLOPs, as below).
    config.train.packing = False
    model_cfg = model_config("test", "", "bfloat16", "float32").with_compute(layer_loop="scan")
    mesh = sharding.make_mesh({"fsdp": 4}, devices)
    # As a run compiles them: not at tests/conftest.py's "highest" matmul precision, which asks
    # the splash attention kernel for fp32 contractions of bf16 operands (Mosaic refuses them).
    with jax.default_matmul_precision("default"):
        result = plan(config, model_cfg, mesh, host_memory=True)

    phases = {p.name: p for p in result["phases"]}
    assert set(phases) == {"score rollouts", "update step", "rollout prefill", "rollout decode"}
    for phase in phases.values():
        # The TPU compiler's memory analysis, and its own cycle estimates in the program.
        assert phase.arguments > 0 and phase.temporaries > 0 and phase.outputs > 0, phase
        assert phase.cycles > 0 and phase.flops > 0, phase
    # The update takes the train state and gives it back in place (donated).
    assert phases["update step"].aliased >= result["params"] + result["opt_state"]
    # The compiler's optimal_seconds (-1 where it has none: the decode loop's data-bounded
    # loops), and a time for every program from its cycles (see plan.plan).
    assert phases["update step"].xla_seconds > 0 and phases["rollout decode"].xla_seconds == 0
    assert all(phase.seconds > 0 for phase in phases.values())
    assert sum(not known for _, known in phases["rollout decode"].loops) == 4  # the decode blocks


def test_matmuls_the_tpu_compiler_writes_are_counted():
    """The TPU compiler writes matmuls as convolutions (batched ones with dilated windows, their
    gradients with padded ones): hlo_cost's count of the compiled program against hand counts."""
    devices = tpu.topology_devices("v5p-8")
    mesh = jax.sharding.Mesh(devices[:1], ("x",))
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, "bfloat16", sharding=jax.NamedSharding(mesh, jax.P()))
    count = lambda f, *args: hlo_cost.loop_cost(jax.jit(f).lower(*args).compile().as_text()).flops
    q, k, w = spec(16, 256, 128), spec(16, 512, 128), spec(4, 128, 512)
    attention = lambda q, k: jax.numpy.einsum("bqd,bkd->bqk", q, k)
    assert count(attention, q, k) == 2 * 16 * 256 * 512 * 128
    # A projection to 4 heads and its gradients for the input and the weights: 3 matmuls.
    loss = lambda x, w: jax.numpy.tanh(jax.numpy.einsum("bsd,hdk->bshk", x, w)).astype("float32").sum()
    assert count(jax.grad(loss, argnums=(0, 1)), q, w) == 3 * 2 * 16 * 256 * 128 * 4 * 512


def test_slice_names_and_layouts():
    assert tpu.parse_slice("v5p-32") == ("v5p", 16) and tpu.parse_slice("v6e-16") == ("v6e", 16)
    assert tpu.parse_slice("h100") is None and tpu.parse_slice("v5p-3") is None
    assert tpu.chip_grid("v5p", 16) == (2, 2, 4) and tpu.chip_grid("v5p", 32) == (2, 4, 4)
    assert tpu.chip_grid("v6e", 8) == (2, 4) and tpu.chip_grid("v5e", 256) == (16, 16)
    with pytest.raises(ValueError, match="a power of two"):
        tpu.chip_grid("v6e", 12)
