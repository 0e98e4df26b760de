"""A synthetic visual task whose answers need the image: coloured shapes on a grid.

Every image holds 1-5 shapes (circle, square, triangle) in four colours on a 3 x 3 grid;
questions ask for counts by colour and/or shape, or the colour of the only shape of a
kind. Rows follow the ViRL39K schema (problem, answer, images as PNG bytes) so the real
data pipeline reads them, plus a `reasoning` field: a short worked answer ending in
\\boxed{} for the supervised warm start. Deterministic by seed.

The worked answers come from a noisy teacher: with probability `teacher_noise` the teacher
misperceives (a count off by one, another colour) and its reasoning and boxed answer are
wrong, while `answer` stays right. A policy fitted to those demonstrations spreads its
probability over near-miss answers, as a VLM warm-started on imperfect traces does; RL
with the verifiable reward is what moves that mass onto the right answer.

    python -m vppo_jax.embedded.synthetic --out=data/synthetic --train=2000 --val=200 --seed=0
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import flags, logging
from PIL import Image, ImageDraw

from vppo_jax.data.prompts import INSTRUCTION, SYSTEM_PROMPT
from vppo_jax.io import paths
from vppo_jax.io.cli import run_program

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
GRID = 3


def draw_scene(objects: list[tuple[int, str, str]], size: int) -> Image.Image:
    """objects: (grid cell, shape, colour). Light grey background, shapes centred in cells."""
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    radius = cell * 0.36
    for index, shape, colour in objects:
        cx, cy = (index % GRID + 0.5) * cell, (index // GRID + 0.5) * cell
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        fill = COLORS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def _question(rng: np.random.Generator, objects) -> tuple[str, str, str]:
    """(problem, answer, reasoning) for one scene, answered correctly."""
    shapes = [shape for _, shape, _ in objects]
    colours = [colour for _, _, colour in objects]
    unique_shapes = [s for s in SHAPES if shapes.count(s) == 1]
    kind = rng.integers(4)
    if kind == 3 and unique_shapes:
        shape = unique_shapes[rng.integers(len(unique_shapes))]
        colour = colours[shapes.index(shape)]
        return f"What color is the {shape}?", colour, f"The {shape} is {colour}."
    if kind == 0:
        colour = list(COLORS)[rng.integers(len(COLORS))]
        n = colours.count(colour)
        return f"How many {colour} shapes are there?", str(n), f"I count {n} {colour} shape{'' if n == 1 else 's'}."
    if kind == 1:
        shape = SHAPES[rng.integers(len(SHAPES))]
        n = shapes.count(shape)
        return f"How many {shape}s are there?", str(n), f"I count {n} {shape}{'' if n == 1 else 's'}."
    colour = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    n = sum(1 for _, s, c in objects if s == shape and c == colour)
    return f"How many {colour} {shape}s are there?", str(n), f"I count {n} {colour} {shape}{'' if n == 1 else 's'}."


def _misperceived(rng: np.random.Generator, answer: str, thought: str) -> tuple[str, str]:
    """The teacher's wrong (answer, reasoning): a neighbouring count or another colour."""
    if answer in COLORS:
        wrong = [c for c in COLORS if c != answer][rng.integers(len(COLORS) - 1)]
        return wrong, thought.replace(f"is {answer}.", f"is {wrong}.")
    n = int(answer)
    wrong = n + 1 if n == 0 or rng.random() < 0.5 else n - 1
    plural = lambda k, noun: f"{k} {noun}{'' if k == 1 else 's'}"
    noun = thought.removeprefix(f"I count {n} ").removesuffix(".").removesuffix("s")
    return str(wrong), f"I count {plural(wrong, noun)}."


def generate_rows(count: int, seed: int, image_size: int = 84, teacher_noise: float = 0.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        cells = rng.choice(GRID * GRID, size=rng.integers(1, 6), replace=False)
        objects = [(int(c), SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]) for c in cells]
        problem, answer, thought = _question(rng, objects)
        taught = answer
        if rng.random() < teacher_noise:
            taught, thought = _misperceived(rng, answer, thought)
        buffer = io.BytesIO()
        draw_scene(objects, image_size).save(buffer, format="PNG")
        rows.append(
            {
                "problem": problem,
                "answer": answer,
                "images": [{"bytes": buffer.getvalue(), "path": None}],
                "reasoning": f"<think> {thought} </think> \\boxed{{{taught}}}",
            }
        )
    return rows


def write_parquet(rows: list[dict], path: str):
    paths.makedirs(os.path.dirname(paths.absolute(path)))
    with paths.open_file(path, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)


def split_paths(directory: str) -> dict[str, str]:
    return {split: os.path.join(directory, f"{split}.parquet") for split in ("train", "val")}


def write_splits(
    directory: str, train: int, val: int, seed: int, image_size: int = 84, teacher_noise: float = 0.0
) -> dict[str, str]:
    """Writes train.parquet and val.parquet (disjoint seeds) and returns their paths."""
    make_rows = lambda count, split_seed: generate_rows(count, split_seed, image_size, teacher_noise)
    return write_generated_splits(directory, train, val, seed, make_rows)


def write_generated_splits(directory: str, train: int, val: int, seed: int, make_rows) -> dict[str, str]:
    """train.parquet and val.parquet of `make_rows(count, seed)` rows, on disjoint seeds (a task of
    this package: the shapes, the reasoning chains); returns their paths."""
    files = split_paths(directory)
    for split, count, split_seed in (("train", train, seed), ("val", val, seed + 1_000_003)):
        write_parquet(make_rows(count, split_seed), files[split])
    return files


def tokenizer_corpus(train_file: str) -> list[str]:
    """Texts a tokenizer for this task must encode compactly: problems, worked answers, and
    the chat prompt around them."""
    table = pq.read_table(paths.open_file(train_file, "rb"), columns=["problem", "reasoning"]).to_pylist()
    chat = f"system {SYSTEM_PROMPT} user {INSTRUCTION} assistant"
    return [chat] * 50 + [f"{row['problem']} {row['reasoning']}" for row in table]


FLAGS = flags.FLAGS


def define_flags(teacher_noise_help: str = "Share of wrong worked answers."):
    """A task's split-writer command line, shared by the tasks (reasoning.py adds its knob)."""
    flags.DEFINE_string("out", None, "Directory for train.parquet and val.parquet.")
    flags.DEFINE_integer("train", 2000, "Training problems.")
    flags.DEFINE_integer("val", 200, "Validation problems.")
    flags.DEFINE_integer("seed", 0, "Seed of the task's problems and images.")
    flags.DEFINE_float("teacher_noise", 0.0, teacher_noise_help)
    flags.mark_flags_as_required(["out"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    print(write_splits(FLAGS.out, FLAGS.train, FLAGS.val, FLAGS.seed, teacher_noise=FLAGS.teacher_noise))


if __name__ == "__main__":
    define_flags()
    run_program(main)
