"""VPPO on Qwen2.5-VL-32B-Instruct (paper: 64.6 avg@8): longer responses (4096 tokens).

    python -m vppo_jax.train --config=configs/vppo_32b.py --workdir=runs/vppo_32b \
        --config.model.path=ckpt/qwen32b --config.data.train_files="('virl39k.parquet',)"
"""

from configs import vppo_7b
from vppo_jax.trainer.config import parse_arg


def get_config(arg: str = ""):
    config = vppo_7b.get_config(arg)
    if not parse_arg(arg, runlocal=False).runlocal:
        config.rollout.max_new_tokens = 4096
        # Weights split 4 ways over `tensor` as well: each device's decode loop then holds a
        # quarter of the gathered decoder, not all of it (v5p-64, `python -m vppo_jax.plan`:
        # decode 141.8 -> 48.1 GiB per device; update step 40.9).
        config.mesh.fsdp, config.mesh.tensor = -1, 4
        # One 8192-token row (4096 prompt + 4096 response) per batch shard per micro-batch.
        config.train.micro_batch_tokens = 8192
        # 32 prompts per wave: 4 per batch shard on v5p-64 (prefill 14.4 GiB per device).
        config.rollout.wave_prompts = 32
    return config
