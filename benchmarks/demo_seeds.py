"""The demo over seeds (docs/results.md#the-demo-over-five-seeds): the embedded default, as is and on one core.

RL trajectories on a CPU depend on float rounding, and another machine rounds differently.
A stand-in for "another machine": the same demo pinned to one core (`taskset -c 0`), where
XLA:CPU splits its reductions over one thread instead of two; the first differences appear
in the last bits at step 2 and grow from there. Each run is the README's first command
with `--config.train.seed=S` in ROOT/<variant>-<S>; finished runs are read, not rerun.

    python -m benchmarks.demo_seeds --seeds=0,1,2,3,4 --variants=native,onecore --root=runs/seeds

Prints per run the warm start and the final validation avg@4 of VPPO and GRPO, then per
variant and method the mean gain with a 95% interval of the mean (Student's t), the
smallest and largest gain, and whether any run collapsed (starved steps or a final accuracy
at or below the warm start).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from absl import app, flags, logging

from vppo_jax.demo.run import accuracy_curve
from vppo_jax.io.cli import parse_flags
from vppo_jax.trainer.metrics import METRICS_FILE, read_metrics

METRIC = "eval/avg@4"
T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def run_demo(workdir: str, seed: int, variant: str):
    if os.path.exists(os.path.join(workdir, "report", "report.json")):
        return
    command = [
        sys.executable,
        "-m",
        "vppo_jax.demo",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.train.seed={seed}",
    ]
    if variant == "onecore":
        if not shutil.which("taskset"):
            raise SystemExit("the onecore variant needs taskset (util-linux)")
        command = ["taskset", "-c", "0", *command]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    with open(f"{workdir}.log", "w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def result(workdir: str, method: str) -> dict:
    run = os.path.join(workdir, method)
    lines = read_metrics(os.path.join(run, METRICS_FILE))
    return {
        "final": accuracy_curve(run, METRIC)[-1][1],
        "starved": sum(1 for line in lines if line.get("rollout/starved_streak")),
    }


FLAGS = flags.FLAGS
VARIANTS = ("native", "onecore")


def define_flags():
    flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Training seeds, comma-separated.")
    flags.DEFINE_list("variants", list(VARIANTS), "Comma-separated: native and/or onecore (pinned to one core).")
    flags.DEFINE_string("root", "runs/seeds", "Directory of the runs.")
    flags.register_validator(
        "seeds",
        lambda seeds: bool(seeds) and all(s.isdigit() for s in seeds),
        message="seeds are integers >= 0, comma-separated: --seeds=0,1,2",
    )
    flags.register_validator(
        "variants",
        lambda variants: bool(variants) and set(variants) <= set(VARIANTS),
        message="variants are native or onecore, comma-separated: --variants=native,onecore",
    )


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    os.makedirs(FLAGS.root, exist_ok=True)
    gains = {}
    print("| variant | seed | warm start | VPPO | GRPO |\n|---|---|---|---|---|")
    for variant in FLAGS.variants:
        for seed in map(int, FLAGS.seeds):
            workdir = os.path.join(FLAGS.root, f"{variant}-{seed}")
            run_demo(workdir, seed, variant)
            with open(os.path.join(workdir, "embedded", "warm_start_eval.json")) as f:
                warm = json.load(f)[METRIC]
            cells = []
            for method in ("vppo", "grpo"):
                r = result(workdir, method)
                gains.setdefault((variant, method), []).append((r["final"] - warm, r["starved"]))
                cells.append(f"{100 * r['final']:.1f}% ({100 * (r['final'] - warm):+.1f})")
            print(f"| {variant} | {seed} | {100 * warm:.1f}% | {cells[0]} | {cells[1]} |")
    print("\n| variant | method | runs | mean gain (95% interval) | smallest | largest | collapsed runs |")
    print("|---|---|---|---|---|---|---|")
    for (variant, method), values in gains.items():
        points = 100 * np.array([g for g, _ in values])
        half = T_975.get(len(points), 1.96) * points.std(ddof=1) / np.sqrt(len(points)) if len(points) > 1 else 0
        collapsed = sum(1 for g, starved in values if starved or g <= 0)
        print(
            f"| {variant} | {method} | {len(points)} | {points.mean():+.1f} ({points.mean() - half:+.1f} to "
            f"{points.mean() + half:+.1f}) | {points.min():+.1f} | {points.max():+.1f} | {collapsed} |"
        )


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
