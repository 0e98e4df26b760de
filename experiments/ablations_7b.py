"""The paper's ablations on the 7B recipe (configs/ablation.py), one trial each.

    python -m vppo_jax.sweeps.launch experiments/ablations_7b.py --root=gs://BUCKET/sweeps \
        --mode=tpu-pod --pod=NAME --zone=ZONE --python=.venv/bin/python

Set up the workers and evaluate and aggregate as for experiments/table1_7b.py. The paper's avg@8
for each: docs/experiments.md#ablations; the full VPPO recipe (57.5) is the `vppo` trial of table1_7b.
"""

CONFIG = "configs/vppo_7b.py"
FIXED = {"model.path": "ckpt/qwen7b", "data.train_files": ("data/virl39k.parquet",)}
ABLATIONS = (
    "vppo_on_grpo",
    "tas_only",
    "tgf_only",
    "entropy_k0.2",
    "entropy_k0.4",
    "random_k0.4",
    "soft_mask",
    "static_0.8_1.2",
    "static_0.9_1.1",
    "noise",
    "gray",
    "jsd",
    "top1_drop",
    "group5",
    "group12",
    "group16",
)
TRIALS = {name: {"config": f"configs/ablation.py:{name}"} for name in ABLATIONS}
METRICS = ("benchmarks/average/avg@8", "rollout/accuracy", "time/step")
