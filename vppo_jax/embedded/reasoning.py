"""A synthetic task in the paper's regime: two perception steps inside a chain of arithmetic.

The shapes task (synthetic.py) is answered in one perception token, so every token of its
answers depends on the image and VPPO's token reweighting has nothing to separate. Here the
image is drawn the same way, but the question asks for two counts (a = the red triangles,
b = the blue squares, kinds chosen per problem) and a calculation on them given in the text:

    Let a be the number of red triangles and b the number of blue squares in the image.
    Start from a, add 3, multiply by 2, subtract 4, then add b, then add 1. What number do you get?

The worked answer reads a, carries out the `gap` operations between a and b, reads b and
finishes with one more operation; only the two counts need the pixels, every other token
follows from the text:

    <think> red triangles: 2. 2 + 3 = 5. 5 * 2 = 10. 10 - 4 = 6. blue squares: 1. 6 + 1 = 7.
    7 + 1 = 8. </think> \\boxed{8}

`gap` is the knob: the operations (six tokens each with the tiny model's tokenizer) between the
two perception steps. The noisy teacher misperceives one of the two counts (off by one) in a `teacher_noise` share of
scenes and computes the rest of the chain correctly from its wrong count, so its boxed answer is
wrong while `answer` stays right. Rows have the shapes task's columns, so its warm start, data
pipeline and reward read them unchanged.

    python -m vppo_jax.embedded.reasoning --out=data/reasoning --train=2000 --val=200 --gap=4
"""

from __future__ import annotations

import io

import numpy as np
from absl import flags, logging

from vppo_jax.embedded import synthetic
from vppo_jax.embedded.synthetic import COLORS, GRID, SHAPES, draw_scene, write_generated_splits
from vppo_jax.io.cli import run_program

KINDS = [(colour, shape) for colour in COLORS for shape in SHAPES]
MAX_COUNT = 3  # of each asked kind; the rest of the 3 x 3 grid holds up to 3 distractors


def _plural(colour: str, shape: str) -> str:
    return f"{colour} {shape}s"


def _scene(rng: np.random.Generator, asked: list[tuple[str, str]], counts: list[int]):
    """(cell, shape, colour) objects: counts[i] of asked[i], plus distractors of other kinds."""
    others = [kind for kind in KINDS if kind not in asked]
    kinds = [kind for kind, n in zip(asked, counts) for _ in range(n)]
    kinds += [others[i] for i in rng.integers(len(others), size=rng.integers(0, 4))]
    cells = rng.choice(GRID * GRID, size=len(kinds), replace=False)
    return [(int(cell), shape, colour) for cell, (colour, shape) in zip(cells, kinds)]


def _operations(rng: np.random.Generator, count: int, start: int) -> list[tuple[str, int]]:
    """`count` operations on a running value from `start`, kept small and non-negative for the
    true count (a misperceived one may leave that range, which the teacher then reports)."""
    ops, value = [], start
    for _ in range(count):
        choices = ["+"] + (["-"] if value > 0 else []) + (["*"] if value <= 10 else [])
        op = choices[rng.integers(len(choices))]
        k = 2 if op == "*" else int(rng.integers(1, min(value, 5) + 1 if op == "-" else 6))
        ops.append((op, k))
        value = _apply(value, op, k)
    return ops


def _apply(value: int, op: str, k: int) -> int:
    return value + k if op == "+" else value - k if op == "-" else value * k


_WORDS = {"+": "add {k}", "-": "subtract {k}", "*": "multiply by {k}"}


def _run(value: int, ops: list[tuple[str, int]]) -> tuple[list[str], int]:
    """The worked steps ("5 * 2 = 10.") of `ops` from `value`, and the result."""
    steps = []
    for op, k in ops:
        new = _apply(value, op, k)
        steps.append(f"{value} {op} {k} = {new}.")
        value = new
    return steps, value


def generate_rows(count: int, seed: int, image_size: int = 84, teacher_noise: float = 0.0, gap: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        asked = [KINDS[i] for i in rng.choice(len(KINDS), size=2, replace=False)]
        a, b = (int(n) for n in rng.integers(0, MAX_COUNT + 1, size=2))
        objects = _scene(rng, asked, [a, b])
        before = _operations(rng, gap, a)
        value = _run(a, before)[1]
        combine = "-" if value >= b and rng.random() < 0.5 else "+"
        after = _operations(rng, 1, _apply(value, combine, b))
        seen = [a, b]
        if rng.random() < teacher_noise:  # one count off by one, the arithmetic right from it
            i = int(rng.integers(2))
            seen[i] += 1 if seen[i] == 0 or rng.random() < 0.5 else -1
        steps, taught = _run(seen[0], before + [(combine, seen[1])] + after)
        (ca, sa), (cb, sb) = asked
        thought = " ".join(
            [f"{_plural(ca, sa)}: {seen[0]}."] + steps[:gap] + [f"{_plural(cb, sb)}: {seen[1]}."] + steps[gap:]
        )
        operations = ", ".join(_WORDS[op].format(k=k) for op, k in before)
        problem = (
            f"Let a be the number of {_plural(ca, sa)} and b the number of {_plural(cb, sb)} in the image. "
            f"Start from a{', ' + operations if operations else ''}, then {_WORDS[combine].format(k='b')}, "
            f"then {_WORDS[after[0][0]].format(k=after[0][1])}. What number do you get?"
        )
        buffer = io.BytesIO()
        draw_scene(objects, image_size).save(buffer, format="PNG")
        rows.append(
            {
                "problem": problem,
                "answer": str(_run(a, before + [(combine, b)] + after)[1]),
                "images": [{"bytes": buffer.getvalue(), "path": None}],
                "reasoning": f"<think> {thought} </think> \\boxed{{{taught}}}",
            }
        )
    return rows


def write_splits(
    directory: str, train: int, val: int, seed: int, image_size: int = 84, teacher_noise: float = 0.0, gap: int = 3
) -> dict[str, str]:
    """Writes train.parquet and val.parquet (disjoint seeds, as the shapes task) and returns their paths."""
    make_rows = lambda count, split_seed: generate_rows(count, split_seed, image_size, teacher_noise, gap)
    return write_generated_splits(directory, train, val, seed, make_rows)


FLAGS = flags.FLAGS


def define_flags():
    synthetic.define_flags("Share of worked answers with a misperceived count.")
    flags.DEFINE_integer("gap", 3, "Arithmetic operations between the two perception steps.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    print(write_splits(FLAGS.out, FLAGS.train, FLAGS.val, FLAGS.seed, teacher_noise=FLAGS.teacher_noise, gap=FLAGS.gap))


if __name__ == "__main__":
    define_flags()
    run_program(main)
