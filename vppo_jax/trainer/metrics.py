"""Metrics a run writes: one JSON line per step and TensorBoard event files, both in the workdir."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import numpy as np
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


def _plain(value):
    """A JSON-safe Python float (NaN/inf become None) from a scalar array or number."""
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Appends {"step": s, name: value, ...} lines to metrics.jsonl and TensorBoard scalars.

    On resume the JSONL keeps only lines before the restored step, so a run killed after
    writing metrics it never checkpointed does not record those steps twice.
    """

    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        if not enabled:
            return
        if os.path.exists(self.path):
            kept = [line for line in read_metrics(self.path) if line["step"] < resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(line) + "\n" for line in kept)
        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        line = {"step": step, **{name: _plain(value) for name, value in sorted(metrics.items())}}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        for name, value in line.items():
            if name != "step" and value is not None:
                self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()

    def close(self):
        if self.enabled:
            self.tensorboard.close()


def read_metrics(path: str) -> list[dict]:
    """The lines of a metrics.jsonl; a torn last line (killed mid-write) is dropped."""
    lines = []
    with open(path) as f:
        for raw in f:
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                break
    return lines


class Timer:
    """Wall time per phase of a step: `with timer("rollout"): ...`, then `timer.metrics()`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        timings = {f"time/{phase}": seconds for phase, seconds in self.seconds.items()}
        timings["time/step"] = sum(self.seconds.values())
        self.seconds = {}
        return timings
