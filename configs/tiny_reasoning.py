"""The embedded default on the reasoning task (vppo_jax/embedded/reasoning.py): the tiny model
must read two counts from the image and carry them through `gap` arithmetic steps given in the
text, so most tokens of an answer read no pixel, the regime VPPO was built for (issue 34).

    python -m vppo_jax.demo.dependency_profile --config=configs/tiny_reasoning.py --workdir=runs/reasoning

Everything else is configs/tiny.py; the answers are longer (about 60 tokens at gap 3), so the
rollouts sample more tokens.
"""

from configs import tiny


def get_config(arg: str = ""):
    config = tiny.get_config(arg)
    config.synthetic.task = "reasoning"
    config.synthetic.gap = 3
    config.rollout.max_new_tokens = 96
    return config
