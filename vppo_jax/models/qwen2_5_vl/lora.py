"""LoRA adapters on the decoder's linear layers, and their merge into full weights.

    model = lora.add_adapters(model, LoRAConfig(rank=16, alpha=32.0, targets=("q_proj", "v_proj")))

A targeted Linear computes x @ W + (alpha / rank) * (x @ A) @ B (+ its bias), A (in, rank) drawn
as PEFT draws it (uniform within 1/sqrt(in)) and B (rank, out) zero: the adapted model starts as
the base model exactly. `merged_kernel` gives W + (alpha / rank) * A @ B for an export.

The adapters are flax's `nnx.LoRA` (no base module), their variables `nnx.LoRAParam`, the type
the trainer trains alone (vppo_jax/trainer/config.py `trainable`). flax's wrappers do not fit
as they are: `nnx.LoRALinear` and `nnx.LoRA(base_module=...)` replace our Linear (its logical
sharding axes, its matmul with the CPU-friendly backward) or move its kernel to another path
(`base_module.kernel`: the HF mapping and the checkpoints name `kernel`), and neither scales by
alpha / rank. So our Linear calls an adapter beside its own matmul, and the adapters of a
stacked layer are made stacked (`layers.stacked`), with logical axes like the kernel's. qwix
(Google's, not installed here) adds adapters by intercepting a model's dot_generals as it runs;
ours run inside lax.scan over stacked weights split out with nnx.split, where adapters created
on the fly would have no "layers" axis: more machinery than the few lines here.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from vppo_jax.models.qwen2_5_vl.layers import stacked

# The decoder's linear layers by their names in every layer (and in PEFT's target_modules):
# the attention's, then the MLP's.
ATTENTION, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION + MLP
# PEFT's kaiming_uniform(a=sqrt(5)) for A: uniform within 1/sqrt(fan_in).
A_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 0  # 0: no adapters
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if self.rank < 0 or self.alpha <= 0:
            raise ValueError(f"model.lora.rank={self.rank}, alpha={self.alpha}: give rank >= 0 (0: off), alpha > 0.")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"model.lora.targets={tuple(self.targets)}: {unknown or 'none'} is not a linear layer of the "
                f"decoder; choose among {TARGETS}."
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Adapter(nnx.LoRA):
    """flax's LoRA (x @ A @ B in the compute dtype), scaled by alpha / rank; A and B carry the
    logical axes of the kernel's input and output (`axes`)."""

    def __init__(self, fan_in: int, fan_out: int, config: LoRAConfig, axes, *, param_dtype, dtype, rngs):
        axis = lambda a: dict(out_sharding=a, eager_sharding=False)  # as layers.param
        super().__init__(
            fan_in,
            config.rank,
            fan_out,
            dtype=dtype,
            param_dtype=param_dtype,
            a_initializer=A_INIT,
            a_metadata=axis((axes[0], None)),
            b_metadata=axis((None, axes[1])),
            rngs=rngs,
        )
        self.scale = config.scale

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x) * self.scale


def decoder_linears(model) -> dict[str, nnx.Module]:
    """The decoder's linear layers by name (each one stacked Linear for all layers)."""
    layers = model.language_model.layers
    return {name: getattr(layers.self_attn if name in ATTENTION else layers.mlp, name) for name in TARGETS}


def add_adapters(model, config: LoRAConfig, seed: int = 0):
    """`model` with adapters on the targeted decoder linears (in place; none when rank is 0)."""
    if not config.rank:
        return model
    cfg, rngs = model.config, nnx.Rngs(seed)
    for name, linear in decoder_linears(model).items():
        if name in config.targets:
            _, fan_in, fan_out = linear.kernel.shape  # (layers, in, out)
            axes = linear.kernel.out_sharding[1:]
            make = lambda r: Adapter(
                fan_in, fan_out, config, axes, param_dtype=cfg.jnp_param_dtype, dtype=cfg.jnp_dtype, rngs=r
            )
            linear.lora = nnx.data(stacked(make, cfg.text.num_hidden_layers, rngs))  # None before: static
    return model


def merged_kernel(kernel: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """W + scale * A @ B in fp32, per layer of stacked (L, in, out), (L, in, r), (L, r, out), in W's dtype."""
    f32 = lambda x: np.asarray(x, np.float32)
    return (f32(kernel) + scale * np.matmul(f32(a), f32(b))).astype(kernel.dtype)
