"""The README's planner table: per-device memory and step time of the VPPO recipes on a few topologies.

    python -m benchmarks.plan_table [--topologies=v5p-32,v5p-64] [--recipes=7B,32B] [--compilers=auto,xla_cpu] \
        [--out=runs/plan]

Runs `python -m vppo_jax.plan` once per (recipe, topology, compiler) on the recipe's own mesh,
each in a fresh process, and prints a markdown table in GiB per device. `auto` is the TPU
compiler for a TPU slice with libtpu installed (requirements-tpu.txt), XLA's GPU compiler for
8xh100 with JAX's CUDA plugin (requirements-gpu.txt); `xla_cpu` the fake-CPU-device estimate.
"""

import json
import os
import subprocess
import sys

from absl import app, flags, logging

from vppo_jax.io.cli import parse_flags

RECIPES = {
    "7B": ("configs/vppo_7b.py", "7b"),
    "32B": ("configs/vppo_32b.py", "32b"),
    "7B-v6e": ("configs/vppo_7b_v6e.py", "7b"),
}
PHASES = ("update step", "score rollouts", "rollout prefill", "rollout decode")


def size(num_bytes: float) -> str:
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:,.1f} {unit}"
    return f"{num_bytes / 2**30:,.1f}"


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_list(
        "topologies",
        ["v5p-32", "v5p-64"],
        "Comma-separated topologies of `python -m vppo_jax.plan --topology`.",
    )
    flags.DEFINE_list("recipes", ["7B", "32B"], f"Comma-separated, some of {','.join(RECIPES)}.")
    flags.DEFINE_list("compilers", ["auto"], "Comma-separated `python -m vppo_jax.plan --compiler` values.")
    flags.DEFINE_string("out", "runs/plan", "Directory of each plan's JSON and text (a plan there is not rerun).")
    flags.register_validator(
        "recipes",
        lambda recipes: bool(recipes) and set(recipes) <= set(RECIPES),
        message=f"recipes are some of {', '.join(RECIPES)}, comma-separated: --recipes=7B,32B",
    )


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    os.makedirs(FLAGS.out, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    rows = []
    for recipe in FLAGS.recipes:
        config, model = RECIPES[recipe]
        for topology in FLAGS.topologies:
            for compiler in FLAGS.compilers:
                rows.append(row(recipe, config, model, topology, compiler, env))
                print(rows[-1], flush=True)
    print(
        "\n| recipe | topology | compiler | mesh (data x fsdp x tensor) | params + optimizer state | update step | "
        "score rollouts | rollout prefill | rollout decode | verdict | step by the compiler | update compile |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def row(recipe: str, config: str, model: str, topology: str, compiler: str, env: dict) -> str:
    """One table row, from the plan's JSON (planned first unless FLAGS.out has it)."""
    path = os.path.join(FLAGS.out, f"{recipe}_{topology}_{compiler}.json")
    if not os.path.exists(path):
        command = [sys.executable, "-m", "vppo_jax.plan", f"--config={config}", f"--model={model}"]
        command += [f"--topology={topology}", f"--compiler={compiler}", f"--json={path}"]
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{recipe} on {topology} ({compiler}) failed:\n{out.stderr[-3000:]}")
        with open(path.replace(".json", ".txt"), "w") as f:
            f.write(out.stdout)
    with open(path) as f:
        plan = json.load(f)
    phases = {p["name"]: p for p in plan["phases"]}
    cells = [size(phases[name]["total"]) if name in phases else "-" for name in PHASES]
    mesh = "x".join(str(plan["mesh"][axis]) for axis in ("data", "fsdp", "tensor"))
    used = plan["peak"] / (plan["device_memory_gib"] * 2**30)
    verdict = f"fits ({100 - 100 * used:.0f}% headroom)" if plan["fits"] else "does not fit"
    step_s = sum(p["seconds"] * p["runs"] for p in plan["phases"])
    step = f"{step_s / 60:.1f} min" if step_s else "-"
    return (
        f"| {recipe} | {topology} ({plan['device_memory_gib']:g} GiB) | {plan['compiler'].split(' ')[0]} | {mesh} | "
        f"{size(plan['params'])} + {size(plan['opt_state'])} | "
        + " | ".join(cells)
        + f" | {verdict} | {step} | {phases['update step']['compile_s']:.0f} s |"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
