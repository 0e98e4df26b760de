"""The embedded default end to end, as the README's first command runs it: RL must visibly learn."""
import json
import os
import subprocess
import sys

import pytest

from vppo_jax.demo import accuracy_curve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC = "eval/avg@4"


@pytest.mark.slow
def test_vppo_raises_validation_accuracy_ten_points_above_the_warm_start(tmp_path):
    """The real tiny recipe (seeded), VPPO only to save CI time: warm start, 80 RL steps, report."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as the README runs it
    command = [sys.executable, "-m", "vppo_jax.demo", "--config=configs/tiny.py", f"--workdir={tmp_path}",
               "--config.demo.methods=('vppo',)"]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "embedded" / "warm_start_eval.json") as f:
        warm_start = json.load(f)[METRIC]
    curve = accuracy_curve(str(tmp_path / "vppo"), METRIC)
    assert [step for step, _ in curve] == [20, 40, 60, 80]
    assert 0.1 < warm_start < 0.6  # the warm start works, and leaves room
    assert curve[-1][1] >= warm_start + 0.10, (warm_start, curve)
    report = tmp_path / "report"
    assert f"| vppo | 80 | {100 * curve[-1][1]:.1f}%" in (report / "report.md").read_text()
    numbers = json.loads((report / "report.json").read_text())
    assert numbers["top_share"] > 0.8  # dependency is sparse: a few tokens hold most of it
    for name in ("accuracy.png", "token_dependency.png", "trajectory_dependency.png", "tokens.html"):
        assert (report / name).stat().st_size > 1000
