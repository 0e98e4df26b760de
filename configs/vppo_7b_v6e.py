"""configs/vppo_7b.py for TPU v6e (Trillium, 32 GiB per chip): 7B on a v6e-64 slice.

    python -m vppo_jax.plan --config=configs/vppo_7b_v6e.py --model=7b --topology=v6e-64
    python -m vppo_jax.train --config=configs/vppo_7b_v6e.py --workdir=runs/vppo_7b_v6e \
        --config.model.path=ckpt/qwen7b --config.data.train_files="('virl39k.parquet',)"

The 7B recipe with its state in bf16 (Kahan-compensated AdamW: 6 bytes per parameter
instead of 12) and one prompt per chip per wave, on 64 chips.
"""

from configs import vppo_7b
from vppo_jax.trainer.config import parse_arg


def get_config(arg: str = ""):
    config = vppo_7b.get_config(arg)
    if not parse_arg(arg, runlocal=False).runlocal:
        config.model.param_dtype = "bfloat16"
        config.rollout.wave_prompts = 64
    return config
