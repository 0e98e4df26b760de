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

import contextlib
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vppo_jax.errors import InputError, one_line
from vppo_jax.io import paths
from vppo_jax.parallel import distributed

CONFIG_FILE = "config.json"
# Fields a restarted run may change without becoming another run. The mesh and the sharding rules
# among them: a checkpoint restores onto any layout of the parameters (elastic resume, on more or
# fewer devices).
RESUMABLE_CHANGES = ("train.steps", "checkpoint.", "eval.every_steps", "logging.", "mesh.", "sharding_rules")


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
    return complete_steps_in(checkpoints_dir(workdir))


def complete_steps_in(directory: str) -> list[int]:
    return sorted(ocp.utils.checkpoint_steps(directory)) if paths.exists(directory) else []


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions): the run stops at once, and the
    checkpoints written before stay as they were."""

    exit_status = 4  # the programs' exit statuses: vppo_jax/io/cli.py


class CheckpointRestoreError(InputError):
    """No complete checkpoint of the run could be restored."""


# A checkpoint that cannot be restored is moved here, out of orbax's sight, and kept.
UNRESTORABLE_DIR = "unrestorable_checkpoints"
# TensorStore's errors quote whole specs: a checkpoint's error line keeps this much of one.
ERROR_TEXT_LIMIT = 400


class RunCheckpoints:
    def __init__(self, workdir: str, keep: int):
        self.workdir = workdir
        self.directory = checkpoints_dir(workdir)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
        )
        self.writing: int | None = None  # the step of the last write started

    def save(self, step: int, state, rng: jax.Array, data_state: dict, host: dict):
        """Starts writing checkpoint `step` (asynchronously). Called by every process with its own
        data_state and host dict. Raises CheckpointWriteError when this or the previous write failed."""
        data_states, hosts = zip(*distributed.allgather((data_state, host)))
        with self._write_errors(self.writing):  # orbax waits for it anyway: a failure is named as its own
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        with self._write_errors(step):
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
        self.writing = step

    def check_written(self):
        """Raises CheckpointWriteError if a write in the background has failed so far (one still in
        flight is not waited for: the trainer calls this between steps, and stops at the first
        boundary after a failure, or at the next save)."""
        with self._write_errors(self.writing):
            self.manager.check_for_errors()

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        try:
            yield
        except Exception as error:  # whatever orbax or the storage raised: the write failed
            kept = [s for s in complete_steps_in(self.directory) if s != step]
            reason = one_line(error, ERROR_TEXT_LIMIT)
            raise CheckpointWriteError(
                f"checkpoint {step} could not be written to {self.directory} ({reason}); the run stopped. "
                f"{f'Checkpoints {kept} are kept' if kept else 'No earlier checkpoint exists'}: fix the cause "
                "(free space, permissions), then rerun the same command to resume."
            ) from error

    def restore_latest(self, abstract_state):
        """(step, state, rng, data states, host dicts) of the newest checkpoint that restores, or
        None when there is none. A checkpoint that does not restore is named with the reason and
        moved to WORKDIR/unrestorable_checkpoints (kept, not deleted); the one before it is tried."""
        unrestorable = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.restore(step, abstract_state)
            except Exception as error:  # a truncated or missing file, whatever layer noticed it
                # Every process reads its own shards: all move on when any could not.
                problem = one_line(error, ERROR_TEXT_LIMIT)
            else:
                problem = None
            problems = [p for p in distributed.allgather(problem) if p]
            if not problems:
                self._set_aside(unrestorable, f"resuming from checkpoint {step}")
                return (step, *restored)
            unrestorable.append((step, problems[0]))
        if unrestorable:
            details = "; ".join(f"checkpoint {s}: {p}" for s, p in unrestorable)
            raise CheckpointRestoreError(
                f"no checkpoint in {self.directory} can be restored ({details}). Move them away to start this run "
                "over, or use a new --workdir."
            )
        return None

    def _set_aside(self, unrestorable: list[tuple[int, str]], outcome: str):
        """Moves the checkpoints that did not restore out of the checkpoint directory, saying why,
        so that the run can write those steps again; process 0 moves, every process waits."""
        if not unrestorable:
            return
        aside = os.path.join(paths.absolute(self.workdir), UNRESTORABLE_DIR)
        if jax.process_index() == 0:
            for step, problem in unrestorable:
                target = os.path.join(aside, str(step))
                if paths.exists(target):  # set aside before: keep both
                    target += time.strftime(".%Y%m%d-%H%M%S")
                print(
                    f"checkpoint {step} cannot be restored ({problem}): {outcome}; it is kept in {target}",
                    file=sys.stderr,
                    flush=True,
                )
                _move_tree(os.path.join(self.directory, str(step)), target)
        distributed.barrier("unrestorable checkpoints set aside")
        self.manager.reload()

    def restore(self, step: int, abstract_state):
        """(state, rng, data states, host dicts) of checkpoint `step`, the last two one per process that
        saved it; arrays laid out like `abstract_state` (its shardings too: a checkpoint written on
        another number of devices restores onto these)."""
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
        """Waits for the writes in flight (CheckpointWriteError if one failed), then closes."""
        with self._write_errors(self.writing):
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        self.manager.close()


def _move_tree(source: str, target: str):
    """A rename on a disk; a copy, then the removal of the source, in an object store (no rename there)."""
    if paths.is_local(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(source, target)
    else:
        paths.copy_tree(source, target)
        paths.remove_tree(source)
