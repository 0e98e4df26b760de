"""avg@k and pass@k: k sampled responses per problem, graded by the reward."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from vppo_jax.rollout import sampling
from vppo_jax.rollout.groups import sample_and_grade


def evaluate_prompts(
    policy,
    prompts: list,
    k: int,
    params: sampling.SamplingParams,
    grade,
    key: jax.Array,
    batch_prompts: int = 16,
    mesh=None,
) -> tuple[dict[str, float], list[dict]]:
    """(summary, per-example results) over `prompts`, in batches of `batch_prompts`, sampled
    on `mesh` (default: one device).

    avg@k is the mean accuracy over all k x N responses (the paper's metric); pass@k the
    share of problems with at least one correct response among their k.
    """
    params = dataclasses.replace(params, group_size=k)
    results = []
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start : start + batch_prompts]
        keys = jax.random.split(jax.random.fold_in(key, start), len(chunk) * k)
        groups, _ = sample_and_grade(policy, chunk, keys, params, grade, policy.model.config.image_token_id, mesh)
        for p, prompt in enumerate(chunk):
            rows = slice(p * k, (p + 1) * k)
            results.append(
                {
                    "index": prompt.index,
                    "answer": prompt.answer,
                    "responses": groups.texts[rows],
                    "rewards": groups.rewards[rows].tolist(),
                }
            )
    rewards = np.array([r["rewards"] for r in results], np.float32).reshape(len(results), k)
    summary = {f"avg@{k}": float(rewards.mean()), f"pass@{k}": float((rewards > 0).any(axis=1).mean())}
    return summary, results
