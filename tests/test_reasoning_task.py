"""The perception-in-reasoning task: answers recomputed from the pixels and the problem's text,
the gap knob, and the teacher's demonstrations graded by the training reward."""

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_synthetic import read_scene

from vppo_jax.demo import dependency_profile
from vppo_jax.embedded import reasoning
from vppo_jax.rollout.rewards.accuracy import accuracy

OPS = {"add": lambda v, k: v + k, "subtract": lambda v, k: v - k, "multiply by": lambda v, k: v * k}
STEP = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)\.")


def answer_from_pixels(problem: str, png: bytes) -> str:
    """Counts the two asked kinds in the image, then follows the problem's operations."""
    kinds = re.match(r"Let a be the number of (\w+) (\w+)s and b the number of (\w+) (\w+)s in the image\.", problem)
    scene = read_scene(png)
    counts = {"a": scene.count((kinds[2], kinds[1])), "b": scene.count((kinds[4], kinds[3]))}
    steps = re.search(r"Start from a, (.+)\. What number", problem)[1].replace("then ", "").split(", ")
    value = counts["a"]
    for step in steps:
        op, k = re.fullmatch(r"(add|subtract|multiply by) (\w+)", step).groups()
        value = OPS[op](value, counts[k] if k == "b" else int(k))
    return str(value)


def test_answers_match_the_pixels():
    rows = reasoning.generate_rows(200, seed=3, gap=3)
    for row in rows:
        assert answer_from_pixels(row["problem"], row["images"][0]["bytes"]) == row["answer"], row["problem"]
    assert len({row["answer"] for row in rows}) > 10  # not a constant answer


@pytest.mark.parametrize("gap", [0, 2, 6])
def test_gap_is_the_number_of_steps_between_the_perception_steps(gap):
    for row in reasoning.generate_rows(50, seed=gap, gap=gap):
        thought = re.fullmatch(r"<think> (.+) </think> \\boxed\{-?\d+\}", row["reasoning"])[1]
        between = re.fullmatch(r"\w+ \w+: \d+\. (.*?)\w+ \w+: \d+\. .*", thought)[1]
        assert len(STEP.findall(between)) == gap
        assert len(STEP.findall(thought)) == gap + 2  # then the step with b and one more


def test_demonstrations_are_graded_right_and_the_teacher_noise_share_wrong():
    clean = reasoning.generate_rows(200, seed=1)
    assert all(accuracy(row["reasoning"], row["answer"]) == 1.0 for row in clean)
    noisy = reasoning.generate_rows(2000, seed=1, teacher_noise=0.35)
    wrong = 0
    for row in noisy:
        for left, op, k, result in STEP.findall(row["reasoning"]):  # the arithmetic is always right
            assert {"+": int(left) + int(k), "-": int(left) - int(k), "*": int(left) * int(k)}[op] == int(result)
        wrong += accuracy(row["reasoning"], row["answer"]) == 0.0
    assert abs(wrong / len(noisy) - 0.35) < 0.035  # a misperceived count always changes the answer


def test_deterministic_by_seed_and_splits_disjoint(tmp_path):
    assert reasoning.generate_rows(10, seed=5) == reasoning.generate_rows(10, seed=5)
    files = reasoning.write_splits(str(tmp_path), train=20, val=10, seed=0, gap=2)
    train, val = (pq.read_table(files[split]).to_pylist() for split in ("train", "val"))
    assert (len(train), len(val)) == (20, 10)
    assert not {r["images"][0]["bytes"] for r in train} & {r["images"][0]["bytes"] for r in val}


def test_profile_marks_the_two_counts_as_perception_tokens():
    row = reasoning.generate_rows(1, seed=0, gap=2)[0]
    tokens = re.findall(r"\s*\S+?(?=[.:\s]|$)|[.:]", row["reasoning"])  # words and punctuation, as a BPE splits
    assert "".join(tokens) == row["reasoning"]
    counts = [t.strip() for t, marked in zip(tokens, dependency_profile.perception_mask(tokens)) if marked]
    assert counts == re.findall(r"s: (\d+)\.", row["reasoning"])
    assert dependency_profile.share_holding(np.array([8.0, 1.0, 1.0, 0.0, 0.0])) == 0.2  # one token holds 80%
