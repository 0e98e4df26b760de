"""Runs every trial of a sweep file, one after another: on this machine, or on a TPU pod with all its workers.

    python -m vppo_jax.sweeps.launch experiments/tiny_2x2.py --root=runs/sweeps [--dry_run]
    python -m vppo_jax.sweeps.launch experiments/vppo_7b_tgf_beta.py --root=gs://BUCKET/sweeps \\
        --mode=tpu-pod --pod=NAME --zone=ZONE [--repo=vppo_jax] [--python=python3] [--dry_run]

Trials run from the repository root (relative paths in the sweep file are relative to it),
trial `name` in ROOT/<sweep>/<name>. A trial whose final checkpoint exists is skipped, so a
relaunch runs only what is left (an interrupted trial resumes from its last checkpoint); a
failed trial is reported and the next one starts; the exit status is 1 if any failed.
--dry_run prints the command of each trial instead of running it.

A preempted trial (exit status 75: it checkpointed its last finished step) is run again at once,
up to MAX_PREEMPTED_RERUNS times, and resumes there. SIGTERM or SIGINT to the launcher itself
(its machine is going away) goes on to the local trial, whose checkpoint the launcher waits
for; then it stops without starting another trial, with exit status 75 (a relaunch goes on).

local: each trial is a `python -m vppo_jax.train` subprocess writing to WORKDIR/train.log.
tpu-pod: each trial is `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd REPO &&
python3 -m vppo_jax.train ..."`, so every worker runs the trainer (REPO is relative to the
workers' home directory, a relative ROOT to REPO). ROOT must be a place all workers share: a
bucket (gs://bucket/sweeps), or a shared filesystem (NFS, Filestore); finished trials are
recognised when it is visible here too.

ROOT may be a bucket in local mode too: every output of the trials (config, metrics,
TensorBoard, checkpoints, train.log) then goes there.
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

from absl import flags, logging

from vppo_jax.io import paths
from vppo_jax.io.cli import parse_flags, run_program
from vppo_jax.sweeps.trials import Trial, finished, load_sweep
from vppo_jax.trainer.preemption import Preempted

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG_FILE = "train.log"
LOG_LINES_SHOWN = 20
MAX_PREEMPTED_RERUNS = 3


def local_command(trial: Trial, workdir: str) -> list[str]:
    return [sys.executable, *trial.train_args(workdir)]


def pod_command(trial: Trial, workdir: str, pod: str, zone: str, repo: str, python: str) -> list[str]:
    remote = f"cd {shlex.quote(repo)} && {shlex.join([python, *trial.train_args(workdir)])}"
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", pod, f"--zone={zone}", "--worker=all", f"--command={remote}"]


class Signals:
    """Inside it, SIGTERM and SIGINT to the launcher are noted (`received`) and passed on to the
    trial running (`child`) once. Trials run in a session of their own, so that a Ctrl-C in the
    terminal reaches them only this way: a second one would stop a trial at once."""

    def __init__(self):
        self.received: int | None = None
        self.child: subprocess.Popen | None = None

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._note) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _note(self, signum, frame):
        if self.received is None and self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
        self.received = self.received or signum

    def run(self, command: list[str], **kwargs) -> int:
        self.child = subprocess.Popen(command, start_new_session=True, **kwargs)
        try:
            return self.child.wait()
        finally:
            self.child = None


def run_local(command: list[str], workdir: str, signals: Signals) -> int:
    """Runs the trial with its output appended to WORKDIR/train.log; returns its exit status.

    A subprocess writes to a file descriptor, which only a local file has: for a workdir in a
    bucket the output goes to a local temporary file, appended to the log when the trial ends.
    """
    log_path = os.path.join(workdir, LOG_FILE)
    if paths.is_local(workdir):
        os.makedirs(workdir, exist_ok=True)
        with open(log_path, "a") as log:
            return signals.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    with tempfile.TemporaryFile("w+", errors="replace") as log:
        status = signals.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.seek(0)
        paths.append_text(log_path, log.read())
    return status


def log_tail(workdir: str) -> str:
    path = os.path.join(workdir, LOG_FILE)
    with paths.open_file(path, "rb") as f:
        lines = f.read().decode(errors="replace").splitlines()[-LOG_LINES_SHOWN:]
    return f"last lines of {path}:\n" + "\n".join("    " + line for line in lines)


def launch(
    sweep_file: str,
    root: str,
    mode: str = "local",
    pod: str | None = None,
    zone: str | None = None,
    repo: str = "vppo_jax",
    python: str = "python3",
    dry_run: bool = False,
) -> int:
    """Runs (or with dry_run prints) every trial not finished yet; 1 if any failed, else 0.
    The arguments are the flags of the command (module docstring)."""
    if mode not in ("local", "tpu-pod"):
        raise ValueError(f"mode={mode!r}: local or tpu-pod")
    if mode == "tpu-pod" and not (pod and zone):
        raise ValueError("--mode=tpu-pod needs --pod and --zone")
    sweep = load_sweep(sweep_file)
    local = mode == "local"
    # Local trials run from the repository root: the root must not depend on where we are.
    root = paths.absolute(root) if local else root
    failed = []
    with Signals() as signals:
        for number, trial in enumerate(sweep.trials, 1):
            if signals.received:
                break
            workdir = sweep.workdir(root, trial)
            command = local_command(trial, workdir) if local else pod_command(trial, workdir, pod, zone, repo, python)
            prefix = f"[{number}/{len(sweep.trials)}] {trial.name}:"
            if finished(workdir):
                print(f"{prefix} finished before, skipped", flush=True)
            elif dry_run:
                print(f"cd {shlex.quote(REPO_ROOT)} && {shlex.join(command)}" if local else shlex.join(command))
            else:
                print(f"{prefix} running in {workdir}", flush=True)
                start = time.time()
                status = run_trial(command, workdir, local, signals, prefix)
                report(status, trial.name, prefix, workdir, local, start, failed, signals)
    if signals.received:
        print(f"stopped by {signal.Signals(signals.received).name}: relaunch to go on", flush=True)
        return Preempted.exit_status
    if failed:
        print(f"{len(failed)} of {len(sweep.trials)} trials failed: {', '.join(failed)}")
    return 1 if failed else 0


def run_trial(command: list[str], workdir: str, local: bool, signals: Signals, prefix: str) -> int:
    """Runs a trial, again after each preemption (up to MAX_PREEMPTED_RERUNS times) unless the
    launcher itself was told to stop; its last exit status."""
    for rerun in range(MAX_PREEMPTED_RERUNS + 1):
        status = run_local(command, workdir, signals) if local else signals.run(command)
        if status != Preempted.exit_status or signals.received or rerun == MAX_PREEMPTED_RERUNS:
            return status
        print(f"{prefix} preempted: running it again from its checkpoint", flush=True)
    return status


def report(status: int, name: str, prefix: str, workdir: str, local: bool, start: float, failed: list, signals):
    """One line on how a trial ended; a failed one is added to `failed` and, local, its log's tail shown."""
    if status == Preempted.exit_status and signals.received:
        print(f"{prefix} stopped after checkpointing its last finished step", flush=True)
    elif status:
        failed.append(name)
        print(f"{prefix} FAILED (exit status {status})", flush=True)
        if local:  # on a pod the output went to this terminal
            print(log_tail(workdir), flush=True)
    else:
        print(f"{prefix} done in {time.time() - start:.0f} s", flush=True)


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("root", None, "Directory of the sweeps' workdirs (local or gs://...).")
    flags.DEFINE_enum("mode", "local", ["local", "tpu-pod"], "Where the trials run.")
    flags.DEFINE_string("pod", None, "tpu-pod: the TPU VM's name.")
    flags.DEFINE_string("zone", None, "tpu-pod: its zone.")
    flags.DEFINE_string("repo", "vppo_jax", "tpu-pod: the repository's directory on the workers.")
    flags.DEFINE_string("python", "python3", "tpu-pod: the workers' Python with vppo_jax installed.")
    flags.DEFINE_bool("dry_run", False, "Print each trial's command instead of running it.")
    flags.mark_flags_as_required(["root"])
    flags.register_multi_flags_validator(
        ["mode", "pod", "zone"],
        lambda f: f["mode"] != "tpu-pod" or bool(f["pod"] and f["zone"]),
        message="--mode=tpu-pod needs --pod and --zone",
    )


def one_sweep_file(words: list[str]) -> list[str]:
    """The command's one positional argument: the sweep file."""
    if len(words) != 1:
        raise ValueError("give one sweep file (experiments/*.py)" + (f"; got {' '.join(words)}" if words else ""))
    return words


def main(argv):
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    return launch(argv[1], FLAGS.root, FLAGS.mode, FLAGS.pod, FLAGS.zone, FLAGS.repo, FLAGS.python, FLAGS.dry_run)


if __name__ == "__main__":
    define_flags()
    run_program(main, flags_parser=functools.partial(parse_flags, arguments=one_sweep_file))
