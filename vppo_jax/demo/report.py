"""The embedded default's report: accuracy of each method per step, and where visual dependency lives.

    write_report(directory, curves, warm_start, samples, wall_seconds)

writes into `directory`:
  report.md            the numbers, and the figures inline
  report.json          the same numbers, for scripts that compare runs or seeds
  accuracy.png         validation accuracy per RL step, one line per method, step 0 = warm start
  token_dependency.png histogram of per-token dependency S_t (the paper's Figure 3)
  trajectory_dependency.png  distribution of per-response mean dependency (the paper's Figure 4)
  tokens.html          sampled responses with each token coloured by its dependency

Everything here is rendering: the numbers come in as plain Python/NumPy values.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import os

import numpy as np
from matplotlib.figure import Figure

from vppo_jax.io import paths

TOP_FRACTION = 0.2  # "the top 20% of tokens hold X% of the total dependency"


@dataclasses.dataclass
class DependencySample:
    """One sampled response with the dependency S_t of each of its tokens."""

    problem: str
    answer: str
    image_png: bytes | None
    tokens: list[str]  # the response's tokens as text
    dependency: np.ndarray  # (len(tokens),) float
    reward: float


def top_share(values: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """Share of the total dependency held by the `fraction` of tokens with the highest values."""
    values = np.sort(np.asarray(values, np.float64))[::-1]
    total = values.sum()
    if not len(values) or total <= 0:
        return float("nan")
    return float(values[: max(int(round(fraction * len(values))), 1)].sum() / total)


def plot_accuracy(curves: dict[str, list[tuple[int, float]]], warm_start: float, metric: str, path: str):
    """One line per method: (RL steps done, accuracy), all starting from the warm start at step 0."""
    figure = Figure(figsize=(6, 4), layout="tight")  # no pyplot: Figure.savefig draws with Agg
    axes = figure.subplots()
    for name, points in curves.items():
        points = [(0, warm_start)] + sorted(points)
        axes.plot([s for s, _ in points], [100 * a for _, a in points], "o-", label=name)
    axes.axhline(100 * warm_start, color="gray", linestyle=":", label="warm start")
    axes.set(xlabel="RL step", ylabel=f"validation {metric} (%)", title="Synthetic shapes task")
    axes.grid(alpha=0.3)
    axes.legend()
    _save_png(figure, path)


def plot_token_dependency(values: np.ndarray, path: str):
    """Histogram of S_t over all response tokens, log-scaled counts: most tokens sit near 0."""
    figure = Figure(figsize=(6, 4), layout="tight")
    axes = figure.subplots()
    axes.hist(values, bins=50, color="tab:blue")
    axes.set_yscale("log")
    share = top_share(values)
    axes.set(
        xlabel="token visual dependency S_t",
        ylabel="tokens (log scale)",
        title=f"Token dependency: top {TOP_FRACTION:.0%} of tokens hold {share:.1%} of the total",
    )
    _save_png(figure, path)


def plot_trajectory_dependency(values: np.ndarray, path: str):
    """Distribution of the per-response mean dependency (what TAS scales advantages by)."""
    figure = Figure(figsize=(6, 4), layout="tight")
    axes = figure.subplots()
    axes.hist(values, bins=30, color="tab:orange")
    axes.axvline(float(np.mean(values)), color="black", linestyle="--", label=f"mean {np.mean(values):.3f}")
    axes.set(
        xlabel="trajectory dependency (mean S_t over a response)", ylabel="responses", title="Trajectory dependency"
    )
    axes.legend()
    _save_png(figure, path)


def _save_png(figure: Figure, path: str):
    with paths.open_file(path, "wb") as f:  # a file object: the report may go to a bucket
        figure.savefig(f, format="png", dpi=120)


def _colour(value: float, scale: float) -> str:
    """White (no dependency) to deep red (the sample's largest), as a CSS background."""
    strength = 0.0 if scale <= 0 else min(value / scale, 1.0)
    return f"rgba(220, 40, 40, {0.85 * strength:.2f})"


def tokens_html(samples: list[DependencySample], path: str):
    """A page of sampled responses, each token's background as red as its dependency is high."""
    scale = float(np.quantile(np.concatenate([s.dependency for s in samples]), 0.99)) if samples else 1.0
    parts = [
        "<!doctype html><meta charset='utf-8'><title>Token visual dependency</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".s{display:flex;gap:1em;margin:1em 0;padding-bottom:1em;border-bottom:1px solid #ddd}"
        ".t{font-family:monospace;white-space:pre-wrap;border-radius:3px}"
        "img{width:84px;height:84px;image-rendering:pixelated}</style>",
        "<h1>Token visual dependency</h1>",
        f"<p>Each response token is coloured by S_t, the divergence between the policy's next-token "
        f"distributions with the image and with a blackened image (white = 0, full red &ge; {scale:.3g}, "
        f"the 99th percentile). Hover a token for its value.</p>",
    ]
    for sample in samples:
        image = ""
        if sample.image_png:
            image = f"<img src='data:image/png;base64,{base64.b64encode(sample.image_png).decode()}'>"
        tokens = "".join(
            f"<span class='t' style='background:{_colour(v, scale)}' title='{v:.4f}'>{html.escape(t)}</span>"
            for t, v in zip(sample.tokens, sample.dependency)
        )
        verdict = "correct" if sample.reward > 0 else "wrong"
        parts.append(
            f"<div class='s'>{image}<div><b>{html.escape(sample.problem)}</b> "
            f"(answer {html.escape(sample.answer)}, {verdict})<br>{tokens}</div></div>"
        )
    paths.write_text(path, "\n".join(parts))


def summary_markdown(
    curves: dict[str, list[tuple[int, float]]],
    warm_start: float,
    metric: str,
    token_values: np.ndarray,
    trajectory_values: np.ndarray,
    wall_seconds: float,
) -> str:
    finals = {name: sorted(points)[-1] for name, points in curves.items() if points}
    lines = [
        "# Embedded default: VPPO vs GRPO on the synthetic shapes task",
        "",
        f"| policy | RL steps | validation {metric} |",
        "|---|---|---|",
        f"| warm start (SFT) | 0 | {100 * warm_start:.1f}% |",
    ]
    lines += [
        f"| {name} | {step} | {100 * acc:.1f}% ({100 * (acc - warm_start):+.1f}) |"
        for name, (step, acc) in finals.items()
    ]
    lines += [
        "",
        f"Token dependency over {len(token_values)} sampled response tokens: the top "
        f"{TOP_FRACTION:.0%} of tokens hold {100 * top_share(token_values):.1f}% of the total; median "
        f"{np.median(token_values):.3g}, mean {np.mean(token_values):.3g}. Trajectory dependency over "
        f"{len(trajectory_values)} responses: mean {np.mean(trajectory_values):.3g}, "
        f"std {np.std(trajectory_values):.3g}.",
        "",
        f"Wall time: {wall_seconds / 60:.1f} min.",
        "",
        "![accuracy](accuracy.png)",
        "![token dependency](token_dependency.png)",
        "![trajectory dependency](trajectory_dependency.png)",
        "",
        "Responses coloured by token dependency: [tokens.html](tokens.html).",
        "",
    ]
    return "\n".join(lines)


def write_report(
    directory: str,
    curves: dict[str, list[tuple[int, float]]],
    warm_start: float,
    metric: str,
    samples: list[DependencySample],
    wall_seconds: float,
) -> str:
    """Writes the report files (module docstring) and returns the path of report.md."""
    paths.makedirs(directory)
    token_values = np.concatenate([s.dependency for s in samples]) if samples else np.zeros(0)
    trajectory_values = np.array([s.dependency.mean() for s in samples if len(s.dependency)])
    plot_accuracy(curves, warm_start, metric, os.path.join(directory, "accuracy.png"))
    plot_token_dependency(token_values, os.path.join(directory, "token_dependency.png"))
    plot_trajectory_dependency(trajectory_values, os.path.join(directory, "trajectory_dependency.png"))
    tokens_html(samples, os.path.join(directory, "tokens.html"))
    numbers = {
        "metric": metric,
        "warm_start": warm_start,
        "curves": curves,
        "final": {name: sorted(points)[-1][1] for name, points in curves.items() if points},
        "top_share": top_share(token_values),
        "top_fraction": TOP_FRACTION,
        "token_dependency_median": float(np.median(token_values)),
        "tokens": len(token_values),
        "trajectory_dependency_mean": float(np.mean(trajectory_values)),
        "wall_seconds": wall_seconds,
    }
    paths.write_json(os.path.join(directory, "report.json"), numbers, indent=1)
    path = os.path.join(directory, "report.md")
    paths.write_text(path, summary_markdown(curves, warm_start, metric, token_values, trajectory_values, wall_seconds))
    return path
