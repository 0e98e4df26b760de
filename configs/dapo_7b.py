"""DAPO baseline on Qwen2.5-VL-7B (paper: 55.0 avg@8): the VPPO recipe without TAS/TGF.

Same clip-higher, dual-clip, entropy penalty and dynamic sampling; no perturbed forward.
    python -m vppo_jax.train --config=configs/dapo_7b.py --workdir=runs/dapo_7b --config.model.path=...
"""

from configs import vppo_7b


def get_config(arg: str = ""):
    config = vppo_7b.get_config(arg)
    config.algo.vppo = False
    return config
