"""GRPO baseline on Qwen2.5-VL-7B (paper: 53.1 avg@8): symmetric clipping, no dynamic sampling.

python -m vppo_jax.train --config=configs/grpo_7b.py --workdir=runs/grpo_7b --config.model.path=...
"""

from configs import vppo_7b


def get_config(arg: str = ""):
    config = vppo_7b.get_config(arg)
    config.algo.vppo = False
    config.algo.online_filter = False
    config.algo.clip_high = 0.2
    config.algo.dual_clip = 3.0
    return config
