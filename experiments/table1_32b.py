"""The paper's 32B rows: GRPO, DAPO and VPPO on Qwen2.5-VL-32B (avg@8 62.6, 63.5, 64.6), 4096-token responses.

    python -m vppo_jax.sweeps.launch experiments/table1_32b.py --root=gs://BUCKET/sweeps \
        --mode=tpu-pod --pod=NAME --zone=ZONE --python=.venv/bin/python

Set up the workers (the model converted to ckpt/qwen32b), then evaluate and aggregate as for
experiments/table1_7b.py (docs/experiments.md#reproducing-table-1).
"""

CONFIG = "configs/vppo_32b.py"
FIXED = {"model.path": "ckpt/qwen32b", "data.train_files": ("data/virl39k.parquet",)}
TRIALS = {
    "grpo": {"config": "configs/grpo_7b.py", "rollout.max_new_tokens": 4096},
    "dapo": {"config": "configs/dapo_7b.py", "rollout.max_new_tokens": 4096},
    "vppo": {},
}
BENCHMARKS = ("mathverse", "dynamath", "mmk12", "geo3k", "mathvision", "wemath", "logicvista", "mmmu_pro")
METRICS = ("benchmarks/average/avg@8", *(f"benchmarks/{name}/avg@8" for name in BENCHMARKS), "time/step")
