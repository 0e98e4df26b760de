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

Ours runs twice per algorithm: as the config comes (one JAX device), and with one JAX CPU
device per core and the rows split over them (`--per_core`; XLA:CPU runs many of a step's
small operations on one thread per device, so one device leaves cores idle). VPPO runs both
ways again with TAS per group (`--per_group_tas`, `algo.tas_scope="per_group"`): each
micro-batch of 8 rows is one group, so the update gives pi_old in-pass and there is no
scoring pass (the default, global TAS, ranks the whole batch before the first gradient).

It also prints the floor of each step on this machine: the step's model FLOPs
(vppo_jax/flops.py on the task's mean prompt and response lengths) at the rate of one large
fp32 matmul of the update's shape, measured after the runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

import peer_runs
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
    flags.DEFINE_bool("per_core", True, "Also run ours on one JAX CPU device per core (rows split over them).")
    flags.DEFINE_bool("per_group_tas", True, "Also run our VPPO with TAS per group (no scoring pass).")


@dataclasses.dataclass
class Run:
    framework: str
    setting: str
    args: tuple[str, ...]
    algo: str = ""  # ours: "grpo" or "vppo"
    scoring_pass: bool = False  # ours: pi_old from a no-gradient forward before the update (as the run reports)
    step: float = 0.0
    rollout: float = 0.0
    tokens_per_second: float = 0.0
    response_tokens: float = 0.0  # mean per completion
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
        completions = peer_runs.PROMPTS_PER_STEP * peer_runs.GROUP_SIZE
        self.response_tokens = statistics.mean(r["tokens"] for r in records) / completions
        self.peak_rss_gib = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
        self.scoring_pass = any(r.get("scored", False) for r in records)

    def row(self) -> str:
        update = self.step - self.rollout
        return (
            f"| {self.framework} | {self.setting} | {self.step:.1f} | {self.rollout:.1f} | {update:.1f} | "
            f"{self.tokens_per_second:,.0f} | {self.peak_rss_gib:.2f} GiB |"
        )


def planned_runs() -> dict[str, Run]:
    runs = {"trl": Run("TRL", "its defaults (micro-batch 32, gradient checkpointing)", ("--framework=trl",))}
    if FLAGS.trl_without_checkpointing:
        runs["trl_no_checkpointing"] = Run(
            "TRL", "gradient checkpointing off", ("--framework=trl", "--nogradient_checkpointing")
        )
    setting = f"micro_batches={FLAGS.micro_batches}" if FLAGS.micro_batches else "the config's defaults"
    per_core = (f"--cpu_devices={os.cpu_count()}",)
    variants = [(algo, algo, ()) for algo in FLAGS.ours]
    if "vppo" in FLAGS.ours and FLAGS.per_group_tas:
        variants.append(("vppo_per_group", "vppo", ("--tas_scope=per_group",)))
    for label, algo, extra in variants:
        args = ("--framework=ours", f"--algo={algo}", f"--micro_batches={FLAGS.micro_batches}", *extra)
        named = lambda where: f"{where}, TAS per group" if extra else where
        runs[label] = Run(f"ours {algo.upper()}", named(setting), args, algo)
        if FLAGS.per_core:
            setting_per_core = named(f"{os.cpu_count()} CPU devices (one per core)")
            runs[f"{label}_per_core"] = Run(f"ours {algo.upper()}", setting_per_core, args + per_core, algo)
    return runs


def matmul_flops_per_second(rows: int = 8192, repeats: int = 20) -> float:
    """fp32 FLOP/s of this machine's best case for the update: one jitted (rows x 256) @ (256 x
    768) matmul, the MLP's up-projection at a micro-batch of 8192 tokens; best of `repeats`."""
    import jax
    import jax.numpy as jnp

    a, b = jnp.ones((rows, 256), jnp.float32), jnp.ones((256, 768), jnp.float32)
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * rows * 256 * 768 / best


def step_flops(run: Run, prompt_tokens: float) -> float:
    """Model FLOPs of one of our steps on the task (vppo_jax/flops.py): VPPO's perturbed
    forward, and where the run has one its scoring pass's forward on the original images
    (GRPO has none: one update per rollout)."""
    from vppo_jax import flops
    from vppo_jax.models.qwen2_5_vl import presets

    config = presets.preset("small", text=dict(vocab_size=peer_task.VOCAB_SIZE))
    patches = (peer_task.IMAGE_SIZE // config.vision.patch_size) ** 2
    shape = flops.StepShape(
        prompts=peer_runs.PROMPTS_PER_STEP,
        group_size=peer_runs.GROUP_SIZE,
        prompt_tokens=prompt_tokens,
        image_patches=patches,
        response_tokens=run.response_tokens,
        scoring_forwards=int(run.scoring_pass),
        perturbed_forwards=int(run.algo == "vppo"),
        prompt_run=peer_runs.GROUP_SIZE,  # micro-batches of 8 rows per device: a group's, prompt run once
    )
    return sum(flops.step_flops(config, shape).values())


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    where = peer_task.write_task(FLAGS.workdir)
    prompt_tokens = peer_task.check_prompts_match(where)
    print(f"task in {FLAGS.workdir}: prompts token-identical for both ({prompt_tokens:.1f} tokens on average)")
    runs = planned_runs()
    for label, run in runs.items():
        run.execute(FLAGS.workdir, label, FLAGS.steps)
    print(f"\nmedians of steps 2-{FLAGS.steps}, seconds:\n")
    print("| framework | setting | s/step | rollout | update | completion tok/s | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for run in runs.values():
        print(run.row())
    trl = runs["trl"]
    ours = [run for run in runs.values() if run.algo]
    for run in ours:
        target = TARGETS[run.algo.upper()]
        ratio = trl.step / run.step
        verdict = "meets" if ratio >= target and run.peak_rss_gib <= trl.peak_rss_gib else "misses"
        print(
            f"{run.algo.upper()} ({run.setting}) ratio: {ratio:.2f}x (TRL's default step / ours); peak RSS "
            f"{run.peak_rss_gib:.2f} vs {trl.peak_rss_gib:.2f} GiB; {verdict} the target (>= {target}x, RSS no higher)"
        )
    rate = matmul_flops_per_second()
    print(f"\nfloor at the best fp32 matmul rate of this machine ({rate / 1e9:.0f} GFLOP/s):")
    for run in ours:
        total = step_flops(run, prompt_tokens)
        print(
            f"{run.algo.upper()} ({run.setting}): {total / 1e12:.2f} TFLOP per step -> floor {total / rate:.1f} s; "
            f"ours {run.step:.1f} s = {run.step * rate / total:.1f}x the floor; the target "
            f"({TARGETS[run.algo.upper()]}x TRL's default) = {trl.step / TARGETS[run.algo.upper()]:.1f} s"
        )


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
