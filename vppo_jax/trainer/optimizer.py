"""The optimizer (clip by global norm, then AdamW) in the precision the parameters are held in.

The config's `model.param_dtype` picks one of two modes; the model computes in `model.dtype`
either way (bf16 in the 7B/32B recipes), casting each weight where it is used:

* "float32" (the default): master parameters and Adam moments in fp32. At the paper's
  learning rate an Adam step moves a weight by about 1e-6, far above fp32's resolution
  (an ulp of a 0.02 weight is 2e-9), so every update lands.
* "bfloat16": parameters and moments in bf16 (8 bytes per parameter instead of 12), each
  update added with Kahan compensation, as the reference's AnyPrecisionAdamW does: a bf16
  buffer keeps what rounding the new weight to bf16 dropped and adds it to the next update.
  Plain AdamW into bf16 weights is not offered: a 1e-6 step is below half a bf16 ulp for
  any weight above about 5e-4 in magnitude and rounds away (benchmarks/optimizer_precision.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from vppo_jax.errors import InputError

PARAM_DTYPES = ("float32", "bfloat16")


def make_optimizer(
    learning_rate: float | optax.Schedule = 1e-6,
    b1=0.9,
    b2=0.999,
    weight_decay=0.01,
    max_grad_norm=1.0,
    param_dtype: str = "float32",
) -> optax.GradientTransformation:
    """The reference's optimizer (clip, then AdamW) for parameters held in `param_dtype`."""
    if param_dtype == "float32":
        adamw = optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
    elif param_dtype == "bfloat16":
        adamw = kahan_adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
    else:
        raise InputError(f"model.param_dtype={param_dtype!r}; choose one of {PARAM_DTYPES}.")
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)


class KahanAdamWState(NamedTuple):
    count: jax.Array
    mu: optax.Updates  # first moment, in the parameters' dtype
    nu: optax.Updates  # second moment, in the parameters' dtype
    compensation: optax.Updates  # what rounding dropped from the last update, in the parameters' dtype


def kahan_adamw(
    learning_rate: float | optax.Schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0
) -> optax.GradientTransformation:
    """AdamW (optax.adamw's arithmetic, in fp32) for low-precision parameters and moments, with
    Kahan-compensated updates. Its updates are fp32 and make `optax.apply_updates` land each
    parameter exactly on the compensated sum rounded to its dtype."""
    schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return KahanAdamWState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(), compensation=zeros())

    def update(grads, state, params):
        count = optax.safe_increment(state.count)
        lr = schedule(state.count)
        mu_scale, nu_scale = 1 / (1 - b1 ** count.astype(jnp.float32)), 1 / (1 - b2 ** count.astype(jnp.float32))

        def leaf(g, mu, nu, compensation, p):
            g, p32 = g.astype(jnp.float32), p.astype(jnp.float32)
            mu = b1 * mu.astype(jnp.float32) + (1 - b1) * g
            nu = b2 * nu.astype(jnp.float32) + (1 - b2) * g * g
            step = -lr * (mu * mu_scale / (jnp.sqrt(nu * nu_scale) + eps) + weight_decay * p32)
            wanted = step + compensation.astype(jnp.float32)  # Kahan: this step plus what was dropped
            landed = (p32 + wanted).astype(p.dtype).astype(jnp.float32) - p32
            return landed, mu.astype(p.dtype), nu.astype(p.dtype), (wanted - landed).astype(p.dtype)

        out = jax.tree.map(leaf, grads, state.mu, state.nu, state.compensation, params)
        part = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=lambda t: isinstance(t, tuple))
        return part(0), KahanAdamWState(count=count, mu=part(1), nu=part(2), compensation=part(3))

    return optax.GradientTransformation(init, update)
