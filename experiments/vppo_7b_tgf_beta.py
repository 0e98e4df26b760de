"""An example sweep on the paper's 7B VPPO recipe: TGF keep ratio x TAS floor (6 trials).

    python -m vppo_jax.sweeps.launch experiments/vppo_7b_tgf_beta.py --root=gs://BUCKET/sweeps \
        --mode=tpu-pod --pod=NAME --zone=ZONE --python=.venv/bin/python
    python -m vppo_jax.sweeps.aggregate experiments/vppo_7b_tgf_beta.py --root=gs://BUCKET/sweeps

The paper's choice is tgf_k=0.4, beta_min=0.9 (57.5 avg@8). Paths are relative to the
repository root on the workers: edit them to where the model and data are.
"""

CONFIG = "configs/vppo_7b.py"
FIXED = {
    "model.path": "ckpt/qwen7b",  # scripts/convert_hf_to_jax.py of Qwen2.5-VL-7B-Instruct
    "data.train_files": ("data/virl39k.parquet",),
    "data.val_files": ("data/val.parquet",),  # held-out problems for the in-training eval/avg@8
}
GRID = {"algo.tgf_k": (0.2, 0.4, 0.6), "algo.beta_min": (0.8, 0.9)}
METRICS = ("eval/avg@8", "eval/pass@8", "benchmarks/average/avg@8", "rollout/accuracy")
