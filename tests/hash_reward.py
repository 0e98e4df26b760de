"""A reward that is 1 for about one response in six (a hash of its text), so a random tiny
model's responses get both outcomes; for the evaluation tests (imported by reward workers)."""

import zlib

from vppo_jax.rollout.rewards import register


@register("one_in_six")
def one_in_six(response: str, answer: str) -> float:
    return float(zlib.crc32(response.encode()) % 6 == 0)
