"""The synthetic shapes task: answers checked by reading the scene back from the image pixels."""

import io
import re

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from vppo_jax.embedded import synthetic

# Reference colours, written out here rather than imported so a change to the generator's
# palette cannot silently change what this test expects.
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 200, 40)}


def read_scene(png: bytes, grid: int = 3) -> list[tuple[str, str]]:
    """(shape, colour) of every occupied grid cell, from pixels alone.

    A filled square covers the corners of its box; a triangle (apex up) covers only the two
    bottom corners; a circle covers none. Samples at 0.8 of the radius from the centre.
    """
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    cell = pixels.shape[0] / grid
    offset = 0.8 * cell * 0.36
    scene = []
    for index in range(grid * grid):
        cx, cy = (index % grid + 0.5) * cell, (index // grid + 0.5) * cell
        colour = _colour(pixels[int(cy), int(cx)])
        if colour is None:
            continue
        filled = lambda dx, dy: _colour(pixels[int(cy + dy), int(cx + dx)]) == colour
        if filled(-offset, -offset) and filled(offset, -offset):
            shape = "square"
        elif filled(-offset, offset) and filled(offset, offset):
            shape = "triangle"
        else:
            shape = "circle"
        scene.append((shape, colour))
    return scene


def _colour(pixel) -> str | None:
    for name, rgb in PALETTE.items():
        if np.abs(pixel - rgb).max() < 30:
            return name
    return None


def answer_from_scene(problem: str, scene: list[tuple[str, str]]) -> str:
    if match := re.fullmatch(r"What color is the (\w+)\?", problem):
        (colour,) = [c for s, c in scene if s == match[1]]  # exactly one such shape, or the test fails
        return colour
    words = re.fullmatch(r"How many (.+) are there\?", problem)[1].split()
    colour = words[0] if words[0] in PALETTE else None
    shape = None if words[-1] == "shapes" else words[-1].removesuffix("s")
    return str(sum(1 for s, c in scene if (colour is None or c == colour) and (shape is None or s == shape)))


def test_answers_match_the_pixels():
    rows = synthetic.generate_rows(300, seed=3)
    kinds = {"color": 0, "count": 0}
    for row in rows:
        scene = read_scene(row["images"][0]["bytes"])
        assert 1 <= len(scene) <= 5
        assert answer_from_scene(row["problem"], scene) == row["answer"], row["problem"]
        kinds["color" if row["problem"].startswith("What color") else "count"] += 1
    assert min(kinds.values()) > 30  # both kinds of question are exercised


def test_deterministic_by_seed_and_splits_disjoint(tmp_path):
    a = synthetic.generate_rows(20, seed=5)
    assert a == synthetic.generate_rows(20, seed=5)
    assert a != synthetic.generate_rows(20, seed=6)
    paths = synthetic.write_splits(str(tmp_path), train=30, val=10, seed=0)
    train = pq.read_table(paths["train"]).to_pylist()
    val = pq.read_table(paths["val"]).to_pylist()
    assert (len(train), len(val)) == (30, 10)
    assert not {r["images"][0]["bytes"] for r in train} & {r["images"][0]["bytes"] for r in val}


def test_teacher_noise_makes_that_share_of_worked_answers_wrong():
    rows = synthetic.generate_rows(2000, seed=0, teacher_noise=0.35)
    wrong = 0
    for row in rows:
        thought, boxed = re.fullmatch(r"<think> (.+) </think> \\boxed\{(\w+)\}", row["reasoning"]).groups()
        assert boxed in thought.split(" ") or f"{boxed}." in thought  # the worked answer agrees with itself
        wrong += boxed != row["answer"]
    assert abs(wrong / len(rows) - 0.35) < 0.035  # binomial sd ~0.011
    clean = synthetic.generate_rows(200, seed=0)
    assert all(r["reasoning"].endswith(f"\\boxed{{{r['answer']}}}") for r in clean)
