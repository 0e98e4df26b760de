"""The embedded default: a tiny random Qwen2.5-VL on the synthetic shapes task, on a CPU.

    python -m vppo_jax.train --config=configs/tiny.py --workdir=runs/tiny

With model.path and data.train_files empty, the trainer writes the synthetic task
(vppo_jax/data/synthetic.py) and a tiny model with its tokenizer (vppo_jax/tiny.py) into
workdir/embedded once and trains on them. Same code path as the 7B recipe.
"""
import ml_collections

from vppo_jax.config import default_config


def get_config(arg: str = ""):
    config = default_config()
    config.model.path = ""
    config.model.dtype = "float32"
    config.synthetic = ml_collections.ConfigDict(dict(train=2000, val=64, seed=0))
    config.data.train_files = ("",)
    config.data.val_files = ("",)
    config.data.min_pixels = 0  # the synthetic images are 84 x 84: no recipe-sized upscaling
    config.data.max_pixels = 0
    config.data.max_prompt_length = 256
    config.rollout.prompts_per_step = 8
    config.rollout.group_size = 4
    config.rollout.max_new_tokens = 24
    config.rollout.top_p = 1.0
    config.rollout.prompt_buckets = (64,)
    config.rollout.max_filter_rounds = 2
    config.reward.timeout_s = 5.0
    config.optim.learning_rate = 1e-4
    config.train.steps = 4
    config.train.updates_per_rollout = 1
    config.checkpoint.every_steps = 2
    config.eval.every_steps = 2
    config.eval.k = 2
    config.eval.max_examples = 16
    if arg == "test":  # the end-to-end tests: even smaller
        config.synthetic.train, config.synthetic.val = 64, 8
        config.rollout.prompts_per_step = 4
        config.rollout.max_new_tokens = 8
        config.eval.max_examples = 4
    return config
