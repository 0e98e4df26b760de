"""VPPO on and off on top of four policy-gradient recipes on Qwen2.5-VL-7B: GRPO, DAPO, Dr.GRPO and
GSPO (8 trials; docs/algorithm.md#policy-losses).

    python -m vppo_jax.sweeps.launch experiments/losses_vppo_7b.py --root=gs://BUCKET/sweeps \
        --mode=tpu-pod --pod=NAME --zone=ZONE --python=.venv/bin/python
    python -m vppo_jax.sweeps.aggregate experiments/losses_vppo_7b.py --root=gs://BUCKET/sweeps

Set up the workers, evaluate and aggregate as for experiments/table1_7b.py, whose grpo, dapo and vppo
trials are grpo_base, dapo_base and dapo_vppo here (grpo_vppo is the paper's "VPPO on plain GRPO"
ablation). Dr.GRPO and GSPO start from the GRPO recipe (no dynamic sampling): Dr.GRPO drops the
advantages' std and the length normalisation; GSPO takes its paper's clip range, 3e-4 / 4e-4, on
the sequence ratio, in the token form so that TGF can filter it.
"""

CONFIG = "configs/vppo_7b.py"
FIXED = {"model.path": "ckpt/qwen7b", "data.train_files": ("data/virl39k.parquet",)}
BASES = {
    "grpo": {"config": "configs/grpo_7b.py"},
    "dapo": {"config": "configs/dapo_7b.py"},
    "dr_grpo": {"config": "configs/grpo_7b.py", "algo.advantage": "dr_grpo", "algo.aggregation": "constant"},
    "gspo": {
        "config": "configs/grpo_7b.py",
        "algo.policy_loss": "gspo_token",
        "algo.aggregation": "sequence",
        "algo.clip_low": 0.0003,
        "algo.clip_high": 0.0004,
    },
}
TRIALS = {
    f"{name}_{'vppo' if vppo else 'base'}": {**base, "algo.vppo": vppo}
    for name, base in BASES.items()
    for vppo in (False, True)
}
BENCHMARKS = ("mathverse", "dynamath", "mmk12", "geo3k", "mathvision", "wemath", "logicvista", "mmmu_pro")
METRICS = ("benchmarks/average/avg@8", *(f"benchmarks/{name}/avg@8" for name in BENCHMARKS), "time/step")
