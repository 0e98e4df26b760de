"""The paper's Table 1 rows on Qwen2.5-VL-7B: GRPO, DAPO and VPPO on ViRL39K (avg@8 53.1, 55.0, 57.5).

    python -m vppo_jax.sweeps.launch experiments/table1_7b.py --root=gs://BUCKET/sweeps \
        --mode=tpu-pod --pod=NAME --zone=ZONE --python=.venv/bin/python
    python -m vppo_jax.eval --checkpoint=gs://BUCKET/sweeps/table1_7b/vppo --data data/benchmarks/*.parquet
    python -m vppo_jax.sweeps.aggregate experiments/table1_7b.py --root=gs://BUCKET/sweeps

The model and data paths below are relative to the repository on each worker; the setup steps of
docs/experiments.md#reproducing-table-1 write them there before the launch (tests/test_docs.py
checks that block as written). Evaluate each trial on the eight benchmarks; the aggregator then
tabulates their avg@8 next to each other.
"""

CONFIG = "configs/vppo_7b.py"
FIXED = {"model.path": "ckpt/qwen7b", "data.train_files": ("data/virl39k.parquet",)}
TRIALS = {
    "grpo": {"config": "configs/grpo_7b.py"},
    "dapo": {"config": "configs/dapo_7b.py"},
    "vppo": {},
}
BENCHMARKS = ("mathverse", "dynamath", "mmk12", "geo3k", "mathvision", "wemath", "logicvista", "mmmu_pro")
METRICS = ("benchmarks/average/avg@8", *(f"benchmarks/{name}/avg@8" for name in BENCHMARKS), "time/step")
