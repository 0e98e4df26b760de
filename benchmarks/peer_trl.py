"""Our trainer against TRL's GRPOTrainer on the same work, one after the other on this machine.

The same HF model directory, data, reward and token-identical prompts (benchmarks/peer_task.py);
per step 32 prompts x 8 samples = 256 completions of up to 128 tokens, lr 1e-6, no KL, one
update per rollout, no dynamic sampling, fp32. Each run is a fresh process
(benchmarks/peer_runs.py); its peak RSS is the kernel's figure for that process and the
children it waited for (our reward workers). Medians over the steps after the first (which
compiles, or warms torch up). Not part of CI: it takes about 15 minutes.

    pip install -r requirements-peer.txt
    python benchmarks/peer_trl.py [--steps=4] [--workdir=/tmp/vppo_peer_trl]

Targets: our GRPO step >= 2x faster than TRL's defaults, VPPO >= 1.5x, our peak RSS no higher.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys

import peer_task
from absl import app, flags, logging

from vppo_jax.io.cli import parse_flags

TARGETS = {"GRPO": 2.0, "VPPO": 1.5}
RUNS_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_runs.py")

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("workdir", "/tmp/vppo_peer_trl", "Where the task, the runs' timings and logs go.")
    flags.DEFINE_integer("steps", 4, "Optimizer steps per run (the first is not counted).")
    flags.DEFINE_list("ours", ["grpo", "vppo"], "Our algorithms to run.")
    flags.DEFINE_integer("micro_batches", 0, "Our train.micro_batches (0: the config's default).")
    flags.DEFINE_bool("trl_without_checkpointing", True, "Also run TRL with gradient checkpointing off.")


@dataclasses.dataclass
class Run:
    framework: str
    setting: str
    args: tuple[str, ...]
    step: float = 0.0
    rollout: float = 0.0
    tokens_per_second: float = 0.0
    peak_rss_gib: float = 0.0

    def execute(self, task: str, label: str, steps: int):
        out, log = (os.path.join(task, f"{label}.{ext}") for ext in ("json", "log"))
        command = [sys.executable, RUNS_SCRIPT, f"--task={task}", f"--out={out}", f"--steps={steps}", *self.args]
        print(f"{self.framework}, {self.setting}: {' '.join(command[1:])}", flush=True)
        with open(log, "w") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage, peak RSS included
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError(f"{self.framework} ({self.setting}) failed; its output is in {log}")
        with open(out) as f:
            records = json.load(f)[1:]  # the first step compiles (ours) or warms up (torch)
        self.step = statistics.median(r["step"] for r in records)
        self.rollout = statistics.median(r["rollout"] for r in records)
        self.tokens_per_second = statistics.median(r["tokens"] / r["step"] for r in records)
        self.peak_rss_gib = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux

    def row(self) -> str:
        update = self.step - self.rollout
        return (
            f"| {self.framework} | {self.setting} | {self.step:.1f} | {self.rollout:.1f} | {update:.1f} | "
            f"{self.tokens_per_second:,.0f} | {self.peak_rss_gib:.1f} GiB |"
        )


def planned_runs() -> dict[str, Run]:
    runs = {"trl": Run("TRL", "its defaults (micro-batch 32, gradient checkpointing)", ("--framework=trl",))}
    if FLAGS.trl_without_checkpointing:
        runs["trl_no_checkpointing"] = Run(
            "TRL", "gradient checkpointing off", ("--framework=trl", "--nogradient_checkpointing")
        )
    setting = f"micro_batches={FLAGS.micro_batches}" if FLAGS.micro_batches else "the config's defaults"
    for algo in FLAGS.ours:
        args = ("--framework=ours", f"--algo={algo}", f"--micro_batches={FLAGS.micro_batches}")
        runs[algo] = Run(f"ours {algo.upper()}", setting, args)
    return runs


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    where = peer_task.write_task(FLAGS.workdir)
    print(f"task in {FLAGS.workdir}: prompts token-identical for both ({peer_task.check_prompts_match(where)} tokens)")
    runs = planned_runs()
    for label, run in runs.items():
        run.execute(FLAGS.workdir, label, FLAGS.steps)
    print(f"\nmedians of steps 2-{FLAGS.steps}, seconds:\n")
    print("| framework | setting | s/step | rollout | update | completion tok/s | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for run in runs.values():
        print(run.row())
    trl = runs["trl"]
    for algo in FLAGS.ours:
        ours, target = runs[algo], TARGETS[algo.upper()]
        ratio = trl.step / ours.step
        verdict = "meets" if ratio >= target and ours.peak_rss_gib <= trl.peak_rss_gib else "misses"
        print(
            f"{algo.upper()} ratio: {ratio:.2f}x (TRL's default step / ours); peak RSS {ours.peak_rss_gib:.1f} vs "
            f"{trl.peak_rss_gib:.1f} GiB; {verdict} the target (>= {target}x, RSS no higher)"
        )


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
