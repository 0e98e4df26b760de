"""The demo report: its numbers from hand-computed cases, its files readable."""

import io
import json
import re

import numpy as np
from PIL import Image

from vppo_jax.demo.report import DependencySample, top_share, write_report


def test_top_share_by_hand():
    assert top_share(np.array([5.0, 0, 0, 0, 0, 0, 0, 0, 0, 0])) == 1.0  # one token of ten holds it all
    assert abs(top_share(np.ones(10)) - 0.2) < 1e-12  # uniform: the top 20% hold 20%
    assert abs(top_share(np.arange(1.0, 11.0)) - (10 + 9) / 55) < 1e-12
    assert np.isnan(top_share(np.zeros(4)))


def test_write_report(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.new("RGB", (84, 84), (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    samples = [
        DependencySample(
            problem="How many <red> circles are there?",
            answer="2",
            image_png=buffer.getvalue(),
            tokens=["<think>", " I", " count", " 2", "</think>", " \\boxed{2}"],
            dependency=rng.exponential(0.1, 6),
            reward=float(i % 2),
        )
        for i in range(4)
    ]
    curves = {"vppo": [(20, 0.42), (40, 0.5)], "grpo": [(20, 0.4), (40, 0.45)]}
    path = write_report(str(tmp_path / "report"), curves, 0.3, "avg@4", samples, wall_seconds=123.0)
    text = open(path).read()
    assert "| warm start (SFT) | 0 | 30.0% |" in text
    assert "| vppo | 40 | 50.0% (+20.0) |" in text and "| grpo | 40 | 45.0% (+15.0) |" in text
    values = np.concatenate([s.dependency for s in samples])
    assert f"hold {100 * top_share(values):.1f}% of the total" in text
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    assert numbers["final"] == {"vppo": 0.5, "grpo": 0.45} and numbers["warm_start"] == 0.3
    assert numbers["top_share"] == top_share(values)
    for name in ("accuracy.png", "token_dependency.png", "trajectory_dependency.png"):
        with Image.open(tmp_path / "report" / name) as figure:
            assert figure.size[0] > 300
    page = open(tmp_path / "report" / "tokens.html").read()
    assert page.count("class='s'") == 4
    assert "&lt;red&gt;" in page and "<red>" not in page  # problem text escaped
    shown = [float(v) for v in re.findall(r"title='([0-9.]+)'", page)]
    np.testing.assert_allclose(shown, values, atol=1e-4)  # every token with its own value
