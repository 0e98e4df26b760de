"""Building blocks shared by the vision tower and the text decoder.

Numerics follow transformers' Qwen2.5-VL: RMSNorm in fp32 cast back before the weight,
attention scores softmaxed in fp32, masks applied in fp32.

Every parameter names its logical axes where it is created (`param`), as NNX sharding
metadata; `vppo_jax.parallel.sharding.param_shardings` maps them to the mesh. The logical
names are those of sharding.RULES: "embed" (the model dimension), "heads", "kv_heads",
"mlp", "vocab", "layers" (added by `stacked`), None (never split).
"""

from __future__ import annotations

import itertools
from typing import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vppo_jax.models.qwen2_5_vl.config import REMAT_CHOICES
from vppo_jax.parallel.sharding import constrain

ACTIVATIONS: dict[str, Callable] = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}

Axes = tuple[str | None, ...]
LAYERS_AXIS = "layers"  # the logical axis `stacked` puts in front of each stacked parameter


def param(value, axes: Axes) -> nnx.Param:
    """A parameter whose dimensions have the logical `axes` (NNX `out_sharding` metadata).

    Not sharded when created (eager_sharding=False): the names are logical, and the mesh
    placement is sharding.param_shardings' business. The metadata lives in the pytree's
    static part, so it survives jit, donation, eval_shape and orbax restores into the tree.
    """
    axes = tuple(axes)
    if len(axes) != len(value.shape):
        raise ValueError(
            f"a parameter of shape {tuple(value.shape)} needs {len(value.shape)} logical axes, got {axes}."
        )
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def normal_init(stddev: float = 0.02):
    return nnx.initializers.normal(stddev)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel stored (in, out) (the transpose of torch's Linear).

    `axes`: the kernel's logical axes (in, out); the bias is split like the output unless
    `bias_axes` says otherwise (a bias over the model dimension stays whole: (None,)).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: Axes,
        use_bias: bool,
        param_dtype,
        dtype,
        rngs: nnx.Rngs,
        bias_axes: Axes | None = None,
    ):
        self.kernel = param(normal_init()(rngs.params(), (in_features, out_features), param_dtype), axes)
        bias_axes = (axes[-1],) if bias_axes is None else bias_axes
        self.bias = param(jnp.zeros((out_features,), param_dtype), bias_axes) if use_bias else None
        self.dtype = dtype
        self.lora = None  # a LoRA adapter added to the output, when fine-tuned that way (lora.py)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = matmul(x, self.kernel[...].astype(self.dtype))
        if self.lora is not None:
            y = y + self.lora(x)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w for x (..., in) and w (in, out), with the weight gradient written as one 2-D
    matmul over the flattened leading axes. Autodiff's own form contracts the (B, T) axes of
    two 3-D arrays, for which XLA:CPU transposes the (B*T, out) output gradient in memory
    first, fused with its elementwise producer (the SiLU gradient): on a CPU that copy cost
    more than the matmuls of the layer's backward."""
    return jnp.dot(x, w)


def _matmul_forward(x, w):
    return jnp.dot(x, w), (x, w)


def _matmul_backward(residuals, dy):
    x, w = residuals
    rows = lambda a: a.reshape(-1, a.shape[-1])
    dw = jax.lax.dot_general(rows(x), rows(dy), (((0,), (0,)), ((), ())))
    return jnp.dot(dy, w.T), dw


matmul.defvjp(_matmul_forward, _matmul_backward)


class RMSNorm(nnx.Module):
    """Normalises in fp32, casts back to the input dtype, then scales (HF order of operations).
    The weight is cast to the input dtype first: fp32 master weights under bf16 compute give
    what a bf16 model computes, and the activations stay bf16."""

    def __init__(self, size: int, *, eps: float, param_dtype):
        self.weight = param(jnp.ones((size,), param_dtype), (None,))  # small: whole on every device
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class GatedMLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); the vision tower has biases, the decoder does not."""

    def __init__(self, hidden: int, intermediate: int, *, act: str, use_bias: bool, param_dtype, dtype, rngs):
        linear = dict(use_bias=use_bias, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        # Hidden units over "mlp" (Megatron: gate/up split on their output, down on its input).
        self.gate_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **linear)
        self.up_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **linear)
        self.down_proj = Linear(intermediate, hidden, axes=("mlp", "embed"), bias_axes=(None,), **linear)
        self.act = ACTIVATIONS[act]

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = activate(self.act, self.gate_proj(x)) * self.up_proj(x)
        # Rows as x's, hidden units over the tensor axis (a no-op outside a mesh).
        return self.down_proj(constrain(hidden, "batch", *[None] * (hidden.ndim - 2), "act_mlp"))


def activate(act: Callable, x: jax.Array) -> jax.Array:
    """The activation in fp32, rounded once: torch's bf16 kernels compute elementwise ops in
    fp32 internally, while x * sigmoid(x) in bf16 would round twice."""
    return act(x.astype(jnp.float32)).astype(x.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    return x * cos + rotate_half(x) * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled dot-product attention with grouped key/value heads.

    q: (..., Tq, H, hd); k, v: (..., Tk, Hkv, hd); mask: broadcastable to (..., Tq, Tk), True
    where a query may attend. Scores are masked and softmaxed in fp32; a fully masked row
    (padding) gets a uniform, finite distribution rather than NaN.
    """
    *lead, tq, num_heads, head_dim = q.shape
    num_kv = k.shape[-2]
    q = q.reshape(*lead, tq, num_kv, num_heads // num_kv, head_dim)
    scores = jnp.einsum("...qkgd,...skd->...kgqs", q, k).astype(jnp.float32) * head_dim**-0.5
    probs = masked_softmax(scores, mask[..., None, None, :, :])
    # Probabilities stay fp32 through the value product, as in torch's fused attention
    # kernels (transformers' default "sdpa"); only the output is rounded to the dtype.
    out = jnp.einsum("...kgqs,...skd->...qkgd", probs, v.astype(jnp.float32)).astype(v.dtype)
    return out.reshape(*lead, tq, num_heads * head_dim)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis of fp32 scores where `mask` is True (broadcast to the scores)."""
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` copies of a layer with parameters stacked on a leading axis, for lax.scan; each
    parameter's logical axes get "layers" in front."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def make(layer_rngs):
        return make_layer(layer_rngs)

    return make(rngs)


def _one_layer(params):
    """Parameters sliced from stacked ones, with "layers" taken out of their logical axes."""
    return nnx.spmd.remove_axis(params, 0, {nnx.PARTITION_NAME: LAYERS_AXIS})


# What the backward pass keeps of each scanned layer (`Qwen2_5_VLConfig.remat`): everything
# (no rematerialisation), only the layer's input (the rest recomputed), or the outputs of its
# matmuls (elementwise work recomputed).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert tuple(REMAT_POLICIES) == REMAT_CHOICES, "config.REMAT_CHOICES names these policies"


def scan_layers(
    layers: nnx.Module, carry, per_layer_inputs, body: Callable, remat: str = "none", layer_loop: str = "scan"
):
    """Runs `body(layer, carry, per_layer_input) -> carry` over stacked layers with lax.scan.

    Scanning compiles one layer instead of L copies: compile time stays flat at 28 or 64 layers;
    layer_loop="unroll" unrolls the loop (config.LAYER_LOOPS). `remat` names what the backward
    keeps of each layer (REMAT_POLICIES).
    """
    with_no_output = lambda layer, carry, per_layer: (body(layer, carry, per_layer), None)
    return scan_layers_with_outputs(layers, carry, per_layer_inputs, with_no_output, remat, layer_loop)[0]


def scan_layers_with_outputs(
    layers: nnx.Module, carry, per_layer_inputs, body: Callable, remat: str = "none", layer_loop: str = "scan"
):
    """Like `scan_layers` for `body(...) -> (carry, output)`; returns the carry and the outputs stacked."""
    graphdef, params = nnx.split(layers)
    return _scan(graphdef, params, carry, per_layer_inputs, body, remat, layer_loop)


def _scan(graphdef, params, carry, per_layer_inputs, body: Callable, remat: str, layer_loop: str):
    def step(carry, xs):
        layer_params, per_layer = xs
        return body(nnx.merge(graphdef, _one_layer(layer_params)), carry, per_layer)

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(step, carry, (params, per_layer_inputs), unroll=layer_loop == "unroll")


Runs = tuple[tuple[Hashable, int], ...]  # (kind, number of consecutive layers of that kind)


def layer_groups(kinds: Sequence[Hashable]) -> tuple[Runs, int, Runs]:
    """Layers of several kinds arranged as (group, repeats, tail): the runs of `group` repeated
    `repeats` times, then the runs of `tail`, chosen to compile the fewest layer bodies (one per
    run of the group and of the tail). Qwen2.5-VL's vision tower, a full-attention layer after
    every 7 windowed ones 4 times, is one group of 2 runs repeated 4 times: 2 bodies, not 8.
    Kinds in no periodic order still run, at worst one body per run."""
    runs = tuple((kind, len(list(same))) for kind, same in itertools.groupby(kinds))

    def arrangement(size):
        repeats = 1
        while runs[repeats * size : (repeats + 1) * size] == runs[:size]:
            repeats += 1
        return runs[:size], repeats, runs[repeats * size :]

    bodies_then_tail = lambda a: (len(a[0]) + len(a[2]), len(a[2]))  # no tail when one is not needed
    return min((arrangement(size) for size in range(1, len(runs) + 1)), key=bodies_then_tail)


def scan_layers_by_kind(
    layers: nnx.Module, carry, kinds: Sequence[Hashable], body: Callable, remat: str = "none", layer_loop: str = "scan"
):
    """Runs `body(layer, carry, kind) -> carry` over stacked layers, `kinds[i]` a static value
    that chooses the code of layer i. Each run of layers of one kind is its own scan, so the
    backward keeps, at every layer, the residuals of that layer's code alone (a `lax.cond` on
    the kind inside one scan would keep those of every kind at every layer). The runs repeat in
    a scan over groups of layers (`layer_groups`); `remat` and `layer_loop` as in `scan_layers`.
    """
    graphdef, params = nnx.split(layers)
    group, repeats, tail = layer_groups(kinds)
    group_size = sum(count for _, count in group)

    def run(stacked_params, carry, runs: Runs):
        """The layers of `stacked_params` (as many as `runs` count) in one scan per run."""
        start = 0
        for kind, count in runs:
            run_params = jax.tree.map(lambda p: p[start : start + count], stacked_params)
            step = lambda layer, carry, _, kind=kind: (body(layer, carry, kind), None)
            carry = _scan(graphdef, run_params, carry, None, step, remat, layer_loop)[0]
            start += count
        return carry

    # The leading axis of the groups' parameters is the group's: a scan step sees one group's
    # layers stacked, as the runs expect.
    grouped = jax.tree.map(lambda p: p[: repeats * group_size].reshape(repeats, group_size, *p.shape[1:]), params)
    group_step = lambda carry, group_params: (run(group_params, carry, group), None)
    carry = jax.lax.scan(group_step, carry, grouped, unroll=layer_loop == "unroll")[0]
    return run(jax.tree.map(lambda p: p[repeats * group_size :], params), carry, tail)


def unstacked(layers: nnx.Module, count: int) -> list[nnx.Module]:
    """The `count` stacked layers as separate modules, for code that runs them one by one."""
    graphdef, params = nnx.split(layers)
    return [nnx.merge(graphdef, _one_layer(jax.tree.map(lambda p: p[i], params))) for i in range(count)]
