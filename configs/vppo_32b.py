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
        # One 8192-token row (4096 prompt + 4096 response) per device per micro-batch.
        config.train.micro_batch_tokens = 8192
        # One prompt per device per wave on v5p-64: the prefill takes 39.6 GiB per device.
        config.rollout.wave_prompts = 32
    return config
