"""A reward that never returns, for the trainer's grader-timeout test (imported by workers)."""

import time

from vppo_jax.rollout.rewards import register


@register("hang")
def hang(response: str, answer: str) -> float:
    time.sleep(3600)
    return 1.0
