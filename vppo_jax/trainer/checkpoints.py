"""A training run's workdir: its resolved config and its orbax checkpoints.

A checkpoint holds everything needed to continue exactly: the train state (step,
parameters, optimizer state, skipped-update count), the run's PRNG key, the data
iterator's position and small host-side counters. Orbax writes each checkpoint
asynchronously and marks it complete (on a disk by renaming a temporary directory, in a
bucket with a commit_success.txt written last), so a run killed at any moment resumes from
the latest complete checkpoint. The workdir may be local or a URL (gs://bucket/run): orbax
takes either.

In a multi-process run every process calls save and restore (orbax coordinates them):
each writes and reads the shards of the sharded arrays its devices hold; the data
iterator positions and host counters, one per process, are gathered and written by
process 0, and each process restores its own.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vppo_jax.errors import InputError
from vppo_jax.io import paths
from vppo_jax.parallel import distributed

CONFIG_FILE = "config.json"
# Fields a restarted run may change without becoming another run.
RESUMABLE_CHANGES = ("train.steps", "checkpoint.", "eval.every_steps", "logging.")


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def claim_workdir(workdir: str, config: ml_collections.ConfigDict):
    """Writes the resolved config into the workdir, or checks that it matches the one there.

    A workdir belongs to one run: starting a different config in it is refused (it would
    mix two runs' checkpoints and metrics) with the differing fields named.
    """
    paths.makedirs(workdir)
    path = os.path.join(workdir, CONFIG_FILE)
    resolved = json.loads(config.to_json_best_effort())
    if paths.exists(path):
        existing = _flatten(paths.read_json(path))
        current = _flatten(resolved)
        differing = sorted(
            key
            for key in existing.keys() | current.keys()
            if existing.get(key) != current.get(key) and not key.startswith(RESUMABLE_CHANGES)
        )
        if differing:
            details = ", ".join(f"{k}: {existing.get(k)!r} -> {current.get(k)!r}" for k in differing[:8])
            raise InputError(
                f"{workdir} holds a run of another config ({details}). Use a new --workdir, or remove "
                "this one to start over."
            )
    paths.write_json(path, resolved)


def checkpoints_dir(workdir: str) -> str:
    return os.path.join(paths.absolute(workdir), "checkpoints")


def complete_steps(workdir: str) -> list[int]:
    """The steps of the run's complete checkpoints, as orbax tells them apart on each backend."""
    return sorted(ocp.utils.checkpoint_steps(checkpoints_dir(workdir)))


class RunCheckpoints:
    def __init__(self, workdir: str, keep: int):
        self.manager = ocp.CheckpointManager(
            checkpoints_dir(workdir),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, rng: jax.Array, data_state: dict, host: dict):
        """Called by every process with its own data_state and host dict."""
        data_states, hosts = zip(*distributed.allgather((data_state, host)))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                # As NumPy: the key lives on one process's device, and orbax saves host arrays from process 0.
                rng=ocp.args.StandardSave({"key": np.asarray(jax.random.key_data(rng))}),
                data=ocp.args.JsonSave({"processes": list(data_states)}),
                host=ocp.args.JsonSave({"processes": list(hosts)}),
            ),
        )

    def restore(self, step: int, abstract_state):
        """(state, rng, data states, host dicts) of checkpoint `step`, the last two one per process that
        saved it; arrays laid out like `abstract_state` (its shardings too)."""
        abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        rng_shape = {"key": ocp.utils.to_shape_dtype_struct(np.asarray(jax.random.key_data(jax.random.key(0))))}
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                rng=ocp.args.StandardRestore(rng_shape),
                data=ocp.args.JsonRestore(),
                host=ocp.args.JsonRestore(),
            ),
        )
        return (
            restored.state,
            jax.random.wrap_key_data(np.asarray(restored.rng["key"])),
            restored.data["processes"],
            restored.host["processes"],
        )

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
