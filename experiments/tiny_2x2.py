"""A 2 x 2 sweep of the embedded default (tiny model, synthetic task) on this machine.

    python -m vppo_jax.train --config=configs/tiny.py --workdir=runs/tiny       # once: the task and warm start
    python -m vppo_jax.sweeps.launch experiments/tiny_2x2.py --root=runs/sweeps
    python -m vppo_jax.sweeps.aggregate experiments/tiny_2x2.py --root=runs/sweeps

Every trial starts from the warm-started tiny model and the synthetic task that the
embedded default wrote into runs/tiny/embedded (without them, each trial would make its own).
"""

CONFIG = "configs/tiny.py"
FIXED = {
    "model.path": "runs/tiny/embedded/warm_start",
    "data.train_files": ("runs/tiny/embedded/train.parquet",),
    "data.val_files": ("runs/tiny/embedded/val.parquet",),
}
GRID = {"algo.tgf_k": (0.2, 0.6), "algo.beta_min": (0.8, 0.9)}
METRICS = ("eval/avg@4", "eval/pass@4", "rollout/accuracy", "loss")
