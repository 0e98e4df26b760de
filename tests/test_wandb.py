"""Weights & Biases beside TensorBoard: off by default (wandb never imported), the metrics
writer's scalars in an offline wandb run when a project is set, the same wandb run continued
on resume, and a clear error before anything loads when wandb is missing."""

import glob
import importlib.util
import json
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from vppo_jax.errors import InputError
from vppo_jax.trainer import config as config_lib
from vppo_jax.trainer import wandb_run
from vppo_jax.trainer.config import default_config
from vppo_jax.trainer.metrics import MetricsWriter

pytest.importorskip("wandb")  # requirements-wandb.txt (in requirements-test.txt)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings(project: str = "vppo-test") -> ml_collections.ConfigDict:
    logging = default_config().logging
    logging.wandb_project, logging.wandb_name = project, "tiny"
    return logging


def test_without_a_project_wandb_is_not_even_imported(tmp_path):
    code = (
        "import sys; from vppo_jax.trainer.config import default_config; from vppo_jax.trainer.metrics import "
        f"MetricsWriter; w = MetricsWriter({str(tmp_path)!r}, logging=default_config().logging); "
        "w.write(0, {'loss': 1.0}); w.close(); assert 'wandb' not in sys.modules, 'wandb was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_scalars_go_to_an_offline_wandb_run_that_a_resumed_run_continues(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine; `wandb sync` would upload it
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = str(tmp_path)
    writer = MetricsWriter(workdir, logging=settings(), run_config={"algo": {"tgf_k": 0.4}})
    writer.write(0, {"loss": 0.25, "eval/avg@8": 0.5})
    writer.write(1, {"loss": 0.125, "entropy": float("nan")})  # not finite: left out, as in TensorBoard
    writer.close()
    run_id = (tmp_path / wandb_run.RUN_ID_FILE).read_text()
    (log,) = glob.glob(f"{workdir}/wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    expected = [text.encode() for text in ("loss", "0.125", "eval/avg@8", "0.5", "tgf_k", "vppo-test")]
    # wandb's service process writes the log; on a loaded machine finish() has returned before
    # its last write (seen once: the 7-byte header alone). It has a minute to finish.
    deadline = time.monotonic() + 60
    while True:
        with open(log, "rb") as f:
            records = f.read()
        if all(text in records for text in expected) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for text in expected:
        assert text in records, text
    assert b"entropy" not in records

    resumed = MetricsWriter(workdir, resume_step=2, logging=settings(), run_config={})
    resumed.write(2, {"loss": 0.0625})
    resumed.close()
    assert (tmp_path / wandb_run.RUN_ID_FILE).read_text() == run_id
    assert len(glob.glob(f"{workdir}/wandb/offline-run-*-{run_id}")) == 2  # two sessions of one wandb run
    assert [json.loads(line)["step"] for line in open(f"{workdir}/metrics.jsonl")] == [0, 1, 2]


def test_a_project_without_wandb_installed_fails_before_anything_loads(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name))
    config = default_config()
    config_lib.check_names(config)  # no project: nothing asked of wandb
    config.logging = settings()
    with pytest.raises(InputError, match="needs wandb, which is not installed: pip install -r requirements-wandb.txt"):
        config_lib.check_names(config)  # what the trainer runs first, before the model loads
