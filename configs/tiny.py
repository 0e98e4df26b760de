"""The embedded default: a tiny random Qwen2.5-VL on the synthetic shapes task, on a CPU.

    python -m vppo_jax.demo --config=configs/tiny.py --workdir=runs/tiny    # warm start, VPPO vs GRPO, report
    python -m vppo_jax.train --config=configs/tiny.py --workdir=runs/tiny_vppo  # the VPPO run alone

With model.path and data.train_files empty, the synthetic task (vppo_jax/embedded/synthetic.py),
a tiny model with its tokenizer (vppo_jax/embedded/tiny_model.py) and its supervised warm start
(vppo_jax/embedded/warm_start.py) are written into workdir/embedded once; RL starts from the warm
start, on the same code path as the 7B recipe.

Hardware: 2 CPU cores. Time: about 6 minutes for the demo command from a fresh clone, install
included. Result (seeds 0-4, `python -m benchmarks.demo_seeds`): validation avg@4 on 128
problems from a 30-32% warm start to 43-47% in 80 steps, VPPO +14.0 and GRPO +14.8 points on
average, no run collapsed (docs/results.md#the-demo-over-five-seeds).

How the RL settings were chosen (VPPO runs, seed 0): lr 1e-3 without warmup collapsed the policy
after its first Adam step (a sign-like update of every weight); lr 1e-3 with at most 2 rounds of
dynamic sampling starved its batches as the policy sharpened and collapsed on some seeds; lr
3e-4 after 10 warmup steps with up to 8 rounds (the rollout default) keeps every step's batch
nearly full.
"""

import ml_collections

from vppo_jax.trainer.config import default_config, parse_arg


def get_config(arg: str = ""):
    config = default_config()
    config.model.path = ""
    config.model.dtype = "float32"
    config.synthetic = ml_collections.ConfigDict(
        dict(
            train=2000,
            val=128,
            seed=0,
            teacher_noise=0.35,
            warm_start_steps=200,
            warm_start_batch=32,
            warm_start_lr=3e-3,
        )
    )
    # python -m vppo_jax.demo: the methods compared (same budget each) and how many validation
    # problems the report's dependency figures sample responses for.
    config.demo = ml_collections.ConfigDict(dict(methods=("vppo", "grpo"), report_prompts=32))
    config.data.train_files = ("",)
    config.data.val_files = ("",)
    config.data.min_pixels = 0  # the synthetic images are 84 x 84: no recipe-sized upscaling
    config.data.max_pixels = 0
    config.data.max_prompt_length = 256
    config.rollout.prompts_per_step = 8
    config.rollout.group_size = 8
    config.rollout.max_new_tokens = 32
    config.rollout.top_p = 1.0
    config.rollout.min_prompt_length = 64
    config.reward.timeout_s = 5.0
    config.optim.learning_rate = 3e-4
    config.optim.warmup_steps = 10
    config.train.steps = 80
    config.train.updates_per_rollout = 1
    # The 64 rows in one packed micro-batch (at most 8 x (256 + 8 x 32) tokens): the step scores
    # them in-pass (no separate scoring).
    config.train.micro_batch_tokens = 4096
    config.checkpoint.every_steps = 20
    config.eval.every_steps = 20
    config.eval.k = 4
    config.eval.max_examples = 128
    if parse_arg(arg, test=False).test:  # the end-to-end tests: even smaller
        config.synthetic.train, config.synthetic.val, config.synthetic.warm_start_steps = 64, 8, 0
        config.rollout.prompts_per_step, config.rollout.group_size = 4, 4
        config.rollout.max_new_tokens = 8
        config.rollout.max_filter_rounds = 2  # an untrained model fills no group: do not sample 8 rounds for nothing
        config.train.steps = 4
        config.checkpoint.every_steps = config.eval.every_steps = 2
        config.eval.k, config.eval.max_examples = 2, 4
    return config
