"""Loop-counted cost of compiled programs (vppo_jax/parallel/hlo_cost.py) against hand counts:
XLA's cost analysis counts a loop body once, hlo_cost counts it as often as it runs."""

import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from vppo_jax.parallel import hlo_cost, sharding
from vppo_jax.plan import model_config, plan

N = 128
MATMUL = 2 * N**3  # one (N, N) @ (N, N)


def cost(function, *args, dynamic_trips: int = 1):
    compiled = jax.jit(function).lower(*args).compile()
    return hlo_cost.loop_cost(compiled.as_text(), dynamic_trips), compiled.cost_analysis()


def test_loops_are_counted_as_often_as_they_run():
    a = jnp.ones((N, N))
    step = lambda c, _: (jnp.tanh(c @ a), None)

    # A scan of 6 matmuls inside a scan of 5: 30 matmuls; XLA's own count has one.
    nested, xla = cost(lambda a: jax.lax.scan(lambda c, _: (jax.lax.scan(step, c, None, 6)[0], None), a, None, 5)[0], a)
    assert nested.flops == 30 * MATMUL and nested.flops_once == MATMUL
    assert xla["flops"] < 2 * MATMUL  # (plus the tanh's few elementwise FLOPs)
    assert sorted(nested.loops) == [(5, True), (6, True)]

    # fori_loop(3, 7): 4 trips (a counter that starts at 3), inside a while loop whose bound is
    # data, which counts as `dynamic_trips`.
    def bounded(a, n):
        body = lambda c: (jax.lax.fori_loop(3, 7, lambda i, d: d @ a, c[0]), c[1] + 1)
        return jax.lax.while_loop(lambda c: c[1] < n, body, (a, 0))[0]

    dynamic, _ = cost(bounded, a, 2, dynamic_trips=9)
    assert dynamic.flops == 9 * 4 * MATMUL
    assert sorted(dynamic.loops) == [(4, True), (9, False)] and dynamic.dynamic_loops == 1

    # A gradient through a scan, against XLA's own count of the same gradient unrolled (no loop
    # left to count once): how autodiff and XLA arrange the backward's matmuls is theirs.
    gradient = lambda unroll: jax.grad(lambda a: jax.lax.scan(step, a, None, 6, unroll=unroll)[0].sum())
    scanned, _ = cost(gradient(False), a)
    unrolled, xla = cost(gradient(True), a)
    assert unrolled.loops == [] and scanned.flops == unrolled.flops >= 2 * 6 * MATMUL
    assert scanned.flops_once < scanned.flops / 5
    assert unrolled.flops <= xla["flops"] < 1.05 * unrolled.flops  # (XLA adds the elementwise FLOPs)


def test_batched_and_conditional_matmuls():
    q, k = jnp.ones((4, 64, 32)), jnp.ones((4, 96, 32))
    batched, _ = cost(lambda q, k: jnp.einsum("bqd,bkd->bqk", q, k), q, k)
    assert batched.flops == 2 * 4 * 64 * 96 * 32
    # A conditional runs one branch: the costlier one counts (3 matmuls, not 3 + 1).
    a = jnp.ones((N, N))
    branches = lambda a, p: jax.lax.cond(p, lambda a: a @ a @ a @ a, lambda a: a @ a, a)
    conditional, _ = cost(branches, a, True)
    assert conditional.flops == 3 * MATMUL


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})


def test_scanned_layers_cost_what_unrolled_ones_do(mesh):
    """The `test` model's prefill with its layers in a scan (one layer in XLA's count) and
    unrolled (no layer loop): the same matmul FLOPs once the scans are counted."""
    flops = {}
    for loop in ("scan", "unroll"):
        model_cfg = model_config("test", "", "float32").with_compute(layer_loop=loop)
        (prefill,) = plan(tiny.get_config(), model_cfg, mesh, phases=("prefill",))["phases"]
        flops[loop] = (prefill.flops, prefill.xla_flops)
    assert flops["scan"][0] == flops["unroll"][0]
    assert flops["scan"][1] < 0.75 * flops["unroll"][1]  # XLA's count misses the scanned layers


def test_micro_batches_are_counted(mesh):
    """The update on 16 rows in two micro-batches and in four of half the rows each (a scan;
    both score first, so the update's work is the same): the same matmul FLOPs per run; XLA's
    count sees one micro-batch, about half."""
    updates = {}
    for micro_batches in (2, 4):
        config = tiny.get_config()
        config.rollout.prompts_per_step, config.rollout.group_size = 4, 4
        config.data.max_prompt_length, config.rollout.max_new_tokens = 64, 8  # small programs: a fast compile
        config.train.micro_batches, config.train.micro_batch_tokens = micro_batches, 0
        result = plan(config, model_config("test", "", "float32"), mesh, phases=("update",))
        assert result["rows"] * micro_batches == 16 and result["extra_forwards"][0] == 1  # scored first
        (updates[micro_batches],) = result["phases"]
    assert updates[4].flops == pytest.approx(updates[2].flops, rel=0.02)
    assert updates[4].xla_flops < 0.6 * updates[2].xla_flops


def test_an_instruction_over_several_lines_stays_in_its_computation():
    """A kernel's metadata spans lines, the last starting with "}}": the instructions after it
    (here the fusion holding the matmul) are still the entry's."""
    text = """HloModule m

%fused (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %d = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %k = f32[4,8]{1,0} custom-call(%a), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"block_q": 256
}}, metadata={op_name="pallas_call"}
  ROOT %f = f32[4,2]{1,0} fusion(%k, %b), kind=kOutput, calls=%fused
}
"""
    counted = hlo_cost.loop_cost(text)
    assert counted.flops == 2 * 4 * 2 * 8 and counted.uncounted_kernels == 1


def test_a_matmul_written_as_a_padded_convolution():
    """How the TPU compiler writes some matmuls: a window of 4 over an input of 1 element padded
    by 3 on each side, so each output element reads one input position: 2 x 8 x 4 x 2 x 16."""
    text = """HloModule m

ENTRY %main (a: bf16[8,16,1], k: bf16[4,2,16]) -> bf16[8,4,2] {
  %a = bf16[8,16,1]{2,1,0} parameter(0)
  %k = bf16[4,2,16]{2,1,0} parameter(1)
  ROOT %c = bf16[8,4,2]{2,1,0} convolution(%a, %k), window={size=4 pad=3_3 rhs_reversal=1}, dim_labels=bf0_0oi->b0f
}
"""
    assert hlo_cost.loop_cost(text).flops == 2 * 8 * 4 * 2 * 16


def test_a_loop_that_counts_in_twos():
    """The SPMD partitioner's windowed matmuls take two shards per trip: counter 0, 2, 4, 6 < 8
    is 4 trips of one matmul each."""
    text = """HloModule m

%cond (p: (u32[], f32[4,4])) -> pred[] {
  %p = (u32[], f32[4,4]{1,0}) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %n = u32[] constant(8)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (u32[], f32[4,4])) -> (u32[], f32[4,4]) {
  %p = (u32[], f32[4,4]{1,0}) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %x = f32[4,4]{1,0} get-tuple-element(%p), index=1
  %d = f32[4,4]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = u32[] constant(2)
  %next = u32[] add(%i, %two)
  ROOT %t = (u32[], f32[4,4]{1,0}) tuple(%next, %d)
}

ENTRY %main (a: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %zero = u32[] constant(0)
  %init = (u32[], f32[4,4]{1,0}) tuple(%zero, %a)
  %w = (u32[], f32[4,4]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[4,4]{1,0} get-tuple-element(%w), index=1
}
"""
    counted = hlo_cost.loop_cost(text)
    assert counted.loops == [(4, True)] and counted.flops == 4 * 2 * 4**3
