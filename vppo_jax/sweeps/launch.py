"""Runs every trial of a sweep file, one after another: on this machine, or on a TPU pod with all its workers.

    python -m vppo_jax.sweeps.launch experiments/tiny_2x2.py --root=runs/sweeps [--dry_run]
    python -m vppo_jax.sweeps.launch experiments/vppo_7b_tgf_beta.py --root=/mnt/shared/sweeps \
        --mode=tpu-pod --pod=NAME --zone=ZONE [--repo=vppo_jax] [--python=python3] [--dry_run]

Trials run from the repository root (relative paths in the sweep file are relative to it),
trial `name` in ROOT/<sweep>/<name>. A trial whose final checkpoint exists is skipped, so a
relaunch runs only what is left (an interrupted trial resumes from its last checkpoint); a
failed trial is reported and the next one starts; the exit status is 1 if any failed.
--dry_run prints the command of each trial instead of running it.

local: each trial is a `python -m vppo_jax.train` subprocess writing to WORKDIR/train.log.
tpu-pod: each trial is `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd REPO &&
python3 -m vppo_jax.train ..."`, so every worker runs the trainer (REPO is relative to the
workers' home directory, a relative ROOT to REPO). ROOT must be a directory all workers share
(NFS, Filestore, a gcsfuse mount); finished trials are recognised when it is visible here too.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

from vppo_jax.sweeps.trials import Trial, finished, load_sweep

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG_FILE = "train.log"
LOG_LINES_SHOWN = 20


def local_command(trial: Trial, workdir: str) -> list[str]:
    return [sys.executable, *trial.train_args(workdir)]


def pod_command(trial: Trial, workdir: str, args: argparse.Namespace) -> list[str]:
    remote = f"cd {shlex.quote(args.repo)} && {shlex.join([args.python, *trial.train_args(workdir)])}"
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.pod, f"--zone={args.zone}", "--worker=all",
            f"--command={remote}"]


def run_local(command: list[str], workdir: str) -> int:
    """Runs the trial with its output appended to WORKDIR/train.log; returns its exit status."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LOG_FILE), "a") as log:
        return subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode


def log_tail(workdir: str) -> str:
    path = os.path.join(workdir, LOG_FILE)
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()[-LOG_LINES_SHOWN:]
    return f"last lines of {path}:\n" + "\n".join("    " + line for line in lines)


def launch(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep)
    local = args.mode == "local"
    # Local trials run from the repository root: the root must not depend on where we are.
    root = os.path.abspath(args.root) if local else args.root
    failed = []
    for number, trial in enumerate(sweep.trials, 1):
        workdir = sweep.workdir(root, trial)
        command = local_command(trial, workdir) if local else pod_command(trial, workdir, args)
        prefix = f"[{number}/{len(sweep.trials)}] {trial.name}:"
        if finished(workdir):
            print(f"{prefix} finished before, skipped", flush=True)
        elif args.dry_run:
            print(f"cd {shlex.quote(REPO_ROOT)} && {shlex.join(command)}" if local else shlex.join(command), flush=True)
        else:
            print(f"{prefix} running in {workdir}", flush=True)
            start = time.time()
            status = run_local(command, workdir) if local else subprocess.run(command).returncode
            if status:
                failed.append(trial.name)
                print(f"{prefix} FAILED (exit status {status})", flush=True)
                if local:  # on a pod the output went to this terminal
                    print(log_tail(workdir), flush=True)
            else:
                print(f"{prefix} done in {time.time() - start:.0f} s", flush=True)
    if failed:
        print(f"{len(failed)} of {len(sweep.trials)} trials failed: {', '.join(failed)}")
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="a sweep file (experiments/*.py)")
    parser.add_argument("--root", required=True, help="directory of the sweeps' workdirs")
    parser.add_argument("--mode", choices=["local", "tpu-pod"], default="local")
    parser.add_argument("--pod", help="tpu-pod: the TPU VM's name")
    parser.add_argument("--zone", help="tpu-pod: its zone")
    parser.add_argument("--repo", default="vppo_jax", help="tpu-pod: the repository's directory on the workers")
    parser.add_argument("--python", default="python3", help="tpu-pod: the workers' Python with vppo_jax installed")
    parser.add_argument("--dry_run", action="store_true", help="print each trial's command instead of running it")
    args = parser.parse_args(argv)
    if args.mode == "tpu-pod" and not (args.pod and args.zone):
        parser.error("--mode=tpu-pod needs --pod and --zone")
    return args


def main(argv: list[str] | None = None) -> int:
    return launch(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
