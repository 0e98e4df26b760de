"""Metrics a run writes: one JSON line per step and TensorBoard event files, both in the workdir,
and optionally the same scalars to Weights & Biases (vppo_jax/trainer/wandb_run.py)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time

import ml_collections
import numpy as np
from tensorboardX import SummaryWriter

from vppo_jax.io import paths
from vppo_jax.trainer import wandb_run

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value):
    """A JSON-safe Python float (NaN/inf become None) from a scalar array or number."""
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None


class TensorBoardScalars:
    """tensorboardX event files in `directory`, local or in a bucket.

    tensorboardX appends to local files only (its own gs:// writer needs another client
    library and re-uploads a whole file from memory at every flush), so for a directory in an
    object store the events go to a local spool directory, and every flush copies its files
    over: one small upload per step.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.spool = None if paths.is_local(directory) else tempfile.mkdtemp(prefix="vppo_tensorboard.")
        self.writer = SummaryWriter(self.spool or directory)

    def write(self, step: int, scalars: dict[str, float]):
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        if self.spool:
            paths.copy_tree(self.spool, self.directory)

    def close(self):
        self.writer.close()
        if self.spool:
            paths.copy_tree(self.spool, self.directory)
            shutil.rmtree(self.spool)


class MetricsWriter:
    """Appends {"step": s, name: value, ...} lines to metrics.jsonl, TensorBoard scalars and,
    with `logging.wandb_project` set, the same to wandb.

    On resume the JSONL keeps only lines before the restored step, so a run killed after
    writing metrics it never checkpointed does not record those steps twice.
    """

    def __init__(
        self,
        workdir: str,
        resume_step: int = 0,
        enabled: bool = True,
        logging: ml_collections.ConfigDict | None = None,
        run_config: dict | None = None,
    ):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        if not enabled:
            return
        if paths.exists(self.path):
            kept = [line for line in read_metrics(self.path) if line["step"] < resume_step]
            paths.write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))
        self.tensorboard = TensorBoardScalars(os.path.join(workdir, TENSORBOARD_DIR))
        use_wandb = logging is not None and logging.wandb_project
        self.wandb = wandb_run.start_run(logging, workdir, run_config or {}) if use_wandb else None

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        line = {"step": step, **{name: _plain(value) for name, value in sorted(metrics.items())}}
        paths.append_text(self.path, json.dumps(line) + "\n")
        scalars = {name: value for name, value in line.items() if name != "step" and value is not None}
        self.tensorboard.write(step, scalars)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self):
        if self.enabled:
            self.tensorboard.close()
            if self.wandb:
                self.wandb.finish()


def read_metrics(path: str) -> list[dict]:
    """The lines of a metrics.jsonl; a torn last line (killed mid-write) is dropped."""
    lines = []
    with paths.open_file(path) as f:
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
