"""Hyperparameter sweeps: trials of a config with overrides, launched locally or on a TPU pod, then tabulated.

    python -m vppo_jax.sweeps.launch experiments/tiny_2x2.py --root=runs/sweeps
    python -m vppo_jax.sweeps.launch experiments/vppo_7b_tgf_beta.py --root=gs://BUCKET/sweeps \
        --mode=tpu-pod --pod=my-v5p-64 --zone=us-east5-a --repo=vppo_jax [--dry_run]
    python -m vppo_jax.sweeps.aggregate experiments/tiny_2x2.py --root=runs/sweeps

A sweep file (experiments/*.py) is plain Python with these names:

    CONFIG = "configs/vppo_7b.py"         # the base config file (":arg" allowed), relative to the repo root
    FIXED = {"model.path": "ckpt/qwen7b"}  # overrides every trial gets (optional)
    GRID = {"algo.tgf_k": (0.2, 0.4, 0.6), "algo.beta_min": (0.8, 0.9)}   # every combination is a trial
    TRIALS = {"dapo": {"config": "configs/dapo_7b.py"}, "vppo": {}}      # or: named trials, instead of GRID
    METRICS = ("eval/avg@8", "eval/pass@8")   # the aggregator's columns; the first is plotted (optional)

Overrides are `--config.<field>=<value>` flags of `python -m vppo_jax.train`; a trial's
"config" entry replaces CONFIG. Trial `name` runs in ROOT/<sweep file name>/<name>.
"""
