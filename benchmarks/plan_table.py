"""The README's planner table: per-device memory of the 7B and 32B VPPO recipes on a few topologies.

    python -m benchmarks.plan_table [--topologies=v5p-8,v5p-32,v4-64,8xh100] [--recipes=7B,32B] [--out=runs/plan]

Runs `python -m vppo_jax.plan` once per (recipe, topology) on the recipe's own mesh, each in a
fresh process (fake device counts differ), and prints a markdown table in GiB per device.
"""

import json
import os
import subprocess
import sys

from absl import app, flags, logging

from vppo_jax.io.cli import parse_flags

RECIPES = {"7B": ("configs/vppo_7b.py", "7b"), "32B": ("configs/vppo_32b.py", "32b")}
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
        ["v5p-8", "v5p-32", "v4-64", "8xh100"],
        "Comma-separated topologies of `python -m vppo_jax.plan --topology`.",
    )
    flags.DEFINE_list("recipes", list(RECIPES), f"Comma-separated, some of {','.join(RECIPES)}.")
    flags.DEFINE_string("out", "runs/plan", "Directory of each plan's JSON and text (a plan there is not rerun).")
    flags.register_validator(
        "recipes",
        lambda recipes: bool(recipes) and set(recipes) <= set(RECIPES),
        message=f"recipes are {' or '.join(RECIPES)}, comma-separated: --recipes=7B,32B",
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
            path = os.path.join(FLAGS.out, f"{recipe}_{topology}.json")
            if not os.path.exists(path):
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "vppo_jax.plan",
                        f"--config={config}",
                        f"--model={model}",
                        f"--topology={topology}",
                        f"--json={path}",
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if out.returncode:
                    sys.exit(f"{recipe} on {topology} failed:\n{out.stderr[-3000:]}")
                with open(path.replace(".json", ".txt"), "w") as f:
                    f.write(out.stdout)
            with open(path) as f:
                plan = json.load(f)
            phases = {p["name"]: p for p in plan["phases"]}
            cells = [size(phases[name]["total"]) if name in phases else "-" for name in PHASES]
            mesh = "x".join(str(plan["mesh"][axis]) for axis in ("data", "fsdp", "tensor"))
            compile_s = phases["update step"]["compile_s"]
            rows.append(
                f"| {recipe} | {topology} ({plan['device_memory_gib']:g} GiB) | {mesh} | "
                f"{size(plan['params'])} + {size(plan['opt_state'])} | "
                + " | ".join(cells)
                + f" | {'fits' if plan['fits'] else 'does not fit'} | {compile_s:.0f} s |"
            )
            print(rows[-1], flush=True)
    print(
        "\n| recipe | topology | mesh (data x fsdp x tensor) | params + optimizer state | update step | "
        "score rollouts | rollout prefill | rollout decode | verdict | update compile |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
