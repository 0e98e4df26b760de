"""A sweep's results: one row per trial with its swept values and final metrics, and a plot.

    python -m vppo_jax.sweeps.aggregate experiments/tiny_2x2.py --root=runs/sweeps [--metrics=loss,entropy] [--out=DIR]

Writes OUT/results.md, OUT/results.csv (the same table) and OUT/<first metric>.png, OUT
being ROOT/<sweep> by default; prints the markdown. A metric's value is the last one its
trial's metrics.jsonl holds: the final step's for per-step metrics, the last evaluation's
for eval/ ones ("nan" where it was not finite, empty where never recorded). Trials that are
still running, failed or never started are listed with their status and steps done.

Benchmark results of `python -m vppo_jax.eval --checkpoint=WORKDIR` (in WORKDIR/evaluation)
are metrics too: benchmarks/<benchmark>/avg@8, benchmarks/<benchmark>/pass@8 and
benchmarks/average/avg@8, ... (k as evaluated).

The plot puts the first metric against the first GRID field, one line per combination of
the other fields; for named TRIALS, one point per trial.
"""

from __future__ import annotations

import csv
import functools
import os
import re

from absl import flags, logging
from matplotlib.figure import Figure

from vppo_jax.eval.benchmarks import EVALUATION_DIR, SUMMARY_FILE
from vppo_jax.io import paths
from vppo_jax.io.cli import parse_flags, run_program
from vppo_jax.sweeps.trials import Sweep, finished, load_sweep
from vppo_jax.trainer.metrics import METRICS_FILE, read_metrics


def benchmark_metrics(workdir: str) -> dict[str, float]:
    """The run's benchmark evaluation (vppo_jax.eval's summary) as metrics:
    {"benchmarks/mathverse/avg@8": ..., "benchmarks/average/avg@8": ..., ...}."""
    path = os.path.join(workdir, EVALUATION_DIR, SUMMARY_FILE)
    if not paths.exists(path):
        return {}
    summary = paths.read_json(path)
    results = {**summary["benchmarks"], "average": summary["average"]}
    return {
        f"benchmarks/{name}/{metric}": value
        for name, result in results.items()
        for metric, value in result.items()
        if "@" in metric
    }


def trial_rows(sweep: Sweep, root: str, metrics: list[str]) -> list[dict]:
    rows = []
    for trial in sweep.trials:
        workdir = sweep.workdir(root, trial)
        path = os.path.join(workdir, METRICS_FILE)
        lines = read_metrics(path) if paths.exists(path) else []
        status = "finished" if finished(workdir) else "incomplete" if lines else "not started"
        row = {
            "trial": trial.name,
            **sweep.swept[trial.name],
            "status": status,
            "steps": lines[-1]["step"] + 1 if lines else 0,
        }
        benchmarks = benchmark_metrics(workdir)
        for metric in metrics:
            recorded = [line[metric] for line in lines if metric in line]
            value = benchmarks.get(metric, recorded[-1] if recorded else "")
            row[metric] = float("nan") if value is None else value  # the metrics writer's None is a non-finite value
        rows.append(row)
    return rows


def swept_fields(sweep: Sweep) -> list[str]:
    return list(dict.fromkeys(field for values in sweep.swept.values() for field in values))


def markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(sweep: Sweep, rows: list[dict], metric: str, path: str) -> bool:
    """Writes the plot of `metric`; False when no trial has recorded it yet."""
    x_field = sweep.grid[0] if sweep.grid else "trial"
    series_fields = sweep.grid[1:]
    numeric = all(isinstance(row[x_field], (int, float)) and not isinstance(row[x_field], bool) for row in rows)
    categories = list(dict.fromkeys(str(row[x_field]) for row in rows))  # every trial's, in the sweep's order
    rows = [row for row in rows if isinstance(row[metric], float)]
    if not rows:
        return False
    series: dict[str, list] = {}
    for row in rows:
        label = ", ".join(f"{field}={row[field]}" for field in series_fields)
        x = row[x_field] if numeric else categories.index(str(row[x_field]))
        series.setdefault(label, []).append((x, row[metric]))
    figure = Figure(figsize=(6, 4), layout="tight")  # no pyplot: a PNG from Figure.savefig is drawn by Agg
    axes = figure.subplots()
    for label, points in series.items():
        points.sort()
        # Lines join values of a swept number; separate categories stay separate points.
        axes.plot([x for x, _ in points], [y for _, y in points], "o-" if numeric else "o", label=label or None)
    if numeric:
        axes.set_xticks(sorted({row[x_field] for row in rows}))  # a tick at each swept value
    else:
        axes.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    axes.set(xlabel=x_field, ylabel=metric, title=sweep.name)
    axes.grid(alpha=0.3)
    if series_fields:
        axes.legend()
    with paths.open_file(path, "wb") as f:
        figure.savefig(f, format="png", dpi=120)
    return True


def aggregate(sweep_file: str, root: str, metrics: list[str] | None = None, out: str | None = None) -> list[dict]:
    """Writes and prints the table, writes the plot; returns the rows. The arguments are the
    flags of the command (module docstring): metrics default to the sweep's METRICS, out to ROOT/<sweep>."""
    sweep = load_sweep(sweep_file)
    metrics = list(metrics or sweep.metrics)
    out = out or os.path.join(root, sweep.name)
    paths.makedirs(out)
    rows = trial_rows(sweep, root, metrics)
    columns = ["trial", *swept_fields(sweep), "status", "steps", *metrics]
    table = markdown(rows, columns)
    paths.write_text(os.path.join(out, "results.md"), table)
    with paths.open_file(os.path.join(out, "results.csv"), "w") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(table)
    png = os.path.join(out, re.sub(r"[^\w.@=+-]", "-", metrics[0]) + ".png")
    print(f"wrote {png}" if plot(sweep, rows, metrics[0], png) else f"no trial has recorded {metrics[0]} yet: no plot")
    return rows


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("root", None, "The --root the sweep was launched with.")
    flags.DEFINE_list("metrics", None, "Columns, comma-separated (default: the sweep's METRICS); the first is plotted.")
    flags.DEFINE_string("out", None, "Default: ROOT/<sweep>.")
    flags.mark_flags_as_required(["root"])


def one_sweep_file(words: list[str]) -> list[str]:
    """The command's one positional argument: the sweep file."""
    if len(words) != 1:
        raise ValueError(
            "give one sweep file (experiments/*.py)"
            + (f"; got {' '.join(words)} (several metrics: --metrics=loss,entropy)" if words else "")
        )
    return words


def main(argv):
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    aggregate(argv[1], FLAGS.root, FLAGS.metrics, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    run_program(main, flags_parser=functools.partial(parse_flags, arguments=one_sweep_file))
