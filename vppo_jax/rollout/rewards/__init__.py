"""Verifiable rewards, graded in worker processes with a time limit (the paper's recipe).

    from vppo_jax.rollout import rewards
    with rewards.RewardPool(workers=8) as pool:            # once per run
        scores, stats = pool.score_responses(responses, answers, "accuracy", timeout_s=10.0)

`scores` is float32 (N,); stats counts {"timeouts", "errors"}, whose rewards are 0.

Adding a reward: a module-level function in an importable module,

    # my_project/rewards.py
    from vppo_jax.rollout.rewards import register

    @register("exact_match")
    def exact_match(response: str, answer: str) -> float:
        return float(response.strip() == answer.strip())

named in the config as `reward.name = "my_project.rewards:exact_match"` (the module is
imported, which registers it; the workers import it the same way).
"""

from vppo_jax.rollout.rewards import accuracy  # noqa: F401  registers "accuracy"
from vppo_jax.rollout.rewards.pool import DEFAULT_TIMEOUT_S, RewardPool, score_responses
from vppo_jax.rollout.rewards.registry import get_reward, register, registered_rewards

__all__ = ["DEFAULT_TIMEOUT_S", "RewardPool", "get_reward", "register", "registered_rewards", "score_responses"]
