"""Weights & Biases beside TensorBoard, when `logging.wandb_project` is set (off by default).

wandb is imported only then: runs and tests without it never need the package
(`pip install -r requirements-wandb.txt`). The run logs the scalars metrics.jsonl gets, at the
same steps, with the resolved config. Its wandb id is kept in WORKDIR/wandb_run_id, so a
restarted run continues the same wandb run; wandb ignores the steps it already has (those
between the last checkpoint and the kill, which the resumed run computes again).
WANDB_MODE=offline keeps everything on disk (`wandb sync` uploads it later). wandb's own files
go to WORKDIR/wandb for a local workdir, else to WANDB_DIR (default ./wandb).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from vppo_jax.io import paths

RUN_ID_FILE = "wandb_run_id"


def check_available(settings: ml_collections.ConfigDict):
    """Raises ImportError before anything loads when wandb is asked for but not installed."""
    if settings.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ImportError(
            f"logging.wandb_project={settings.wandb_project!r} needs wandb, which is not installed: "
            "pip install -r requirements-wandb.txt"
        )


def start_run(settings: ml_collections.ConfigDict, workdir: str, config: dict):
    """The wandb run of the training run in `workdir` (a new one, or the one it started before)."""
    import wandb

    id_path = os.path.join(workdir, RUN_ID_FILE)
    run = wandb.init(
        project=settings.wandb_project,
        entity=settings.wandb_entity or None,
        name=settings.wandb_name or None,
        id=paths.read_text(id_path).strip() if paths.exists(id_path) else None,
        resume="allow",
        config=config,
        dir=workdir if paths.is_local(workdir) else None,
    )
    paths.write_text(id_path, run.id)
    return run
