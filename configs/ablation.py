"""The paper's ablations on the 7B recipe, by name (section 5 of the paper):

    python -m vppo_jax.train --config=configs/ablation.py:tas_only --workdir=runs/tas_only ...

Names (paper's 7B avg@8 in brackets): vppo_on_grpo [54.8], tas_only [56.3], tgf_only [57.1],
entropy_k0.2 [56.0], entropy_k0.4 [55.7], random_k0.4 [54.8], soft_mask [56.2],
static_0.8_1.2, static_0.9_1.1, noise, gray (blur is not in-step: docs/algorithm.md#perturbed-image), jsd [56.9],
top1_drop [50.3], group5 [56.5], group12 [57.4], group16 [57.7]. Append ",runlocal" to shrink.
"""

from configs import grpo_7b, vppo_7b
from vppo_jax.trainer.config import parse_arg

ABLATIONS = {
    "tas_only": dict(tgf=False),
    "tgf_only": dict(tas=False),
    "entropy_k0.2": dict(tgf_mode="entropy", tgf_k=0.2),
    "entropy_k0.4": dict(tgf_mode="entropy", tgf_k=0.4),
    "random_k0.4": dict(tgf_mode="random", tgf_k=0.4),
    "soft_mask": dict(tgf_mode="soft"),
    "static_0.8_1.2": dict(tas_mode="static", beta_min=0.8, beta_max=1.2),
    "static_0.9_1.1": dict(tas_mode="static", beta_min=0.9, beta_max=1.1),
    "noise": dict(perturbation="noise"),
    "gray": dict(perturbation="gray"),
    "jsd": dict(estimator="jsd"),
    "top1_drop": dict(estimator="top1_drop"),
}
GROUP_SIZES = {"group5": 5, "group12": 12, "group16": 16}


def get_config(arg: str = ""):
    variant = parse_arg(arg, name="", runlocal=False)
    name, size = variant.name, "runlocal" if variant.runlocal else ""
    if name == "vppo_on_grpo":
        config = grpo_7b.get_config(size)
        config.algo.vppo = True
        return config
    config = vppo_7b.get_config(size)
    if name in GROUP_SIZES:
        config.rollout.group_size = GROUP_SIZES[name]
    elif name in ABLATIONS:
        config.algo.update(ABLATIONS[name])
    else:
        raise ValueError(f"Unknown ablation {name!r}; choose one of {['vppo_on_grpo', *ABLATIONS, *GROUP_SIZES]}.")
    return config
