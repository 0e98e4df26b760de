"""How far each precision mode moves the weights at the paper's learning rate, against fp32 AdamW.

Weights drawn N(0, 0.02), 60 AdamW steps at lr 1e-6 (weight decay 0.01) with the same
gradients for every mode: one fixed direction, or that direction plus as much fresh noise per
step. Printed per mode: the share of weights that ever moved and
the total movement relative to AdamW on fp32 weights. "plain bf16" is optax.adamw added
into bf16 weights, the baseline the modes are measured against (not offered: its steps round
away). Measured: docs/results.md#optimizer-precision.

    python -m benchmarks.optimizer_precision
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vppo_jax.trainer.optimizer import make_optimizer

WEIGHTS, STEPS, LR = 100_000, 60, 1e-6


def run(optimizer, weights, grads, dtype):
    params = jnp.asarray(weights, dtype)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, grad):
        updates, state = optimizer.update(grad, state, params)
        return optax.apply_updates(params, updates), state

    start, ever_moved = np.asarray(params, np.float64), np.zeros(weights.shape, bool)
    for grad in grads:
        previous = params
        params, state = step(params, state, jnp.asarray(grad))
        ever_moved |= np.asarray(params != previous)
    return np.asarray(params, np.float64) - start, ever_moved


def main():
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal(WEIGHTS) * 0.02).astype(np.float32)
    direction = (rng.standard_normal(WEIGHTS) * 1e-3).astype(np.float32)
    settings = {
        "fixed gradient": [direction] * STEPS,
        "fixed + noise": [direction + (rng.standard_normal(WEIGHTS) * 1e-3).astype(np.float32) for _ in range(STEPS)],
    }
    modes = {
        "fp32 master (model.param_dtype=float32)": (make_optimizer(LR, param_dtype="float32"), jnp.float32),
        "bf16 + Kahan (model.param_dtype=bfloat16)": (make_optimizer(LR, param_dtype="bfloat16"), jnp.bfloat16),
        "plain bf16 (optax.adamw into bf16, not offered)": (
            optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=0.01)),
            jnp.bfloat16,
        ),
    }
    print(f"{WEIGHTS} weights N(0, 0.02), {STEPS} steps at lr {LR}")
    print("| mode | gradients | weights that ever moved | total movement vs fp32 AdamW |\n|---|---|---|---|")
    for setting, grads in settings.items():
        reference, _ = run(modes["fp32 master (model.param_dtype=float32)"][0], weights, grads, jnp.float32)
        for mode, (optimizer, dtype) in modes.items():
            moved, ever = run(optimizer, weights, grads, dtype)
            print(
                f"| {mode} | {setting} | {100 * ever.mean():.1f}% | "
                f"{np.abs(moved).sum() / np.abs(reference).sum():.3f}x |"
            )


if __name__ == "__main__":
    main()
