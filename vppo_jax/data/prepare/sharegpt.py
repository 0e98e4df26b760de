"""The LLaMA-Factory ShareGPT layout of the PAPO evaluation suite (PAPO-Galaxy/PAPO_eval,
chamber111/VPPO-Eval): a `messages` list with one user turn (the question, its `<image>`
placeholders, then the output instruction) and one assistant turn (the reference answer),
and an `images` list of paths to image files (docs/datasets.md#the-eight-benchmarks).

The suite bakes the reasoning instruction into every question. Our prompt template adds
that same sentence (vppo_jax/data/prompts.py INSTRUCTION), so it is cut from the question
here; kept, the model would read it twice. A question that does not end with it is kept
whole and not counted in the report's `instruction_removed`.
"""

from __future__ import annotations

from typing import Any

from vppo_jax.data.prepare.example import Fields, Skip
from vppo_jax.data.prompts import INSTRUCTION

COLUMNS = ("messages", "images")


def fields(row: dict) -> Fields:
    messages = row.get("messages")
    if not isinstance(messages, list) or not all(isinstance(turn, dict) for turn in messages):
        raise Skip("bad_row", f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    question, answer = turn_content(messages, "user"), turn_content(messages, "assistant")
    problem, removed = without_instruction(question)
    return Fields(problem, answer, row.get("images"), notes=("instruction_removed",) if removed else ())


def turn_content(messages: list[dict], role: str) -> Any:
    """The content of the first turn of `role`, None when there is none."""
    return next((turn.get("content") for turn in messages if turn.get("role") == role), None)


def without_instruction(question: Any) -> tuple[Any, bool]:
    """(the question without the trailing instruction, whether it had one)."""
    if not isinstance(question, str) or not question.rstrip().endswith(INSTRUCTION):
        return question, False
    return question.rstrip().removesuffix(INSTRUCTION).rstrip(), True
