"""avg@k and pass@k of a policy on benchmark files, at the paper's evaluation settings: the
evaluation behind `python -m vppo_jax.eval` (vppo_jax/eval/__main__.py: its flags and usage).

    evaluate(EvalOptions(checkpoint="runs/vppo_7b", data=("mathverse.parquet", "dynamath.parquet")))

Every problem gets k responses sampled at temperature 1.0, top-p 1.0 (the paper's evaluation). Per
benchmark file: avg@k, the mean accuracy over all k x N responses (the paper's metric), and
pass@k, the share of problems with at least one correct response; the average is the
unweighted mean over benchmarks, as in the paper's Avg column. Writes OUT/<benchmark>.jsonl and
OUT/summary.json (OUT defaults to WORKDIR/evaluation for a run, where the sweep aggregator finds it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import zlib

import jax
import ml_collections
from tokenizers import Tokenizer

from vppo_jax import data as data_lib
from vppo_jax.data.prompts import PromptBuilder
from vppo_jax.errors import InputError
from vppo_jax.eval import runs
from vppo_jax.io import hub, paths
from vppo_jax.models.qwen2_5_vl.hf_io import model_from_params
from vppo_jax.rollout.evaluation import evaluate_prompts
from vppo_jax.rollout.policy import TOKENIZER_FILE, Policy, load_policy, prompt_builder
from vppo_jax.rollout.rewards import RewardPool
from vppo_jax.trainer import config as config_lib

# The paper samples its evaluation responses at temperature 1.0, top-p 1.0 (docs/algorithm.md#reward-and-evaluation).
PAPER_SAMPLING = dict(temperature=1.0, top_p=1.0, top_k=0)
EVALUATION_DIR, SUMMARY_FILE = "evaluation", "summary.json"  # a run's evaluation, where the sweep aggregator looks


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how; None takes the run's setting (a run's workdir) or the recipe's.
    The flags of `python -m vppo_jax.eval` have these names and defaults."""

    checkpoint: str  # a run's workdir, an HF directory (or Hub name) or a converted checkpoint
    data: tuple[str, ...]  # benchmark files (.parquet, .jsonl), one benchmark each
    out: str | None = None  # default with a run's workdir: WORKDIR/evaluation
    k: int = 8  # responses per problem
    step: int | None = None  # with a run's workdir: its checkpoint (default latest)
    problem_key: str | None = None
    answer_key: str | None = None
    images_key: str | None = None
    max_new_tokens: int | None = None
    reward: str | None = None
    dtype: str | None = None
    max_examples: int = 0  # first N usable problems per file (0: all)
    batch_prompts: int = 16  # problems sampled together
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "data", (self.data,) if isinstance(self.data, str) else tuple(self.data))


def load_run(workdir: str, step: int | None, dtype: str | None) -> tuple[Policy, ml_collections.ConfigDict, int]:
    """The policy of a training run at checkpoint `step` (the latest if None), and the run's config.
    Only the parameters are read (vppo_jax/eval/runs.py), straight into the compute dtype."""
    config = runs.run_config(workdir)
    config.model.dtype = dtype or config.model.dtype
    model_config, shapes, load, step = runs.open_run_params(workdir, step, config.model.dtype)
    hf_dir = runs.base_model_dir(workdir, config)
    tokenizer_path = os.path.join(hf_dir, TOKENIZER_FILE)
    if not paths.is_file(tokenizer_path):
        raise InputError(f"{hf_dir} has no {TOKENIZER_FILE}; copy the tokenizer files of the original model there.")
    model = model_from_params(model_config, ((p, load(p)) for p in shapes))
    return Policy(model, Tokenizer.from_str(paths.read_text(tokenizer_path)), hf_dir), config, step


def load_checkpoint(path: str, step: int | None, dtype: str | None):
    """(policy, settings config, step or None) for a run (its workdir, or one of its checkpoint
    directories), an HF directory (or Hub name) or a converted checkpoint."""
    run = runs.run_and_step(path, step)
    if run:
        return load_run(*run, dtype)
    if step is not None:
        raise InputError(f"--step={step} needs a training run's workdir; {path} is not one.")
    path = hub.resolve_model(path)
    if not paths.is_dir(path):
        raise InputError(f"--checkpoint={path!r} does not exist.")
    config = config_lib.default_config()
    try:
        policy = load_policy(path, dtype or config.model.dtype)
    except FileNotFoundError as error:
        raise InputError(
            f"--checkpoint={path!r} is neither a training run's workdir (config.json + checkpoints/), an HF model "
            "directory (config.json + *.safetensors) nor a checkpoint written by scripts/convert_hf_to_jax.py."
        ) from error
    return policy, config, None


def benchmark_name(path: str) -> str:
    return os.path.basename(path).split(".")[0]


def prompt_chunks(path: str, builder: PromptBuilder, config, size: int, max_examples: int, skips):
    """The usable prompts of a benchmark file in file order, `size` at a time; a whole benchmark's
    images would not fit in memory at the recipe's image budget."""
    d = config.data
    dataset = data_lib.prompt_dataset(
        [path],
        builder,
        seed=0,
        shuffle=False,
        num_epochs=1,
        problem_key=d.problem_key,
        answer_key=d.answer_key,
        images_key=d.images_key,
    )
    chunk, used = [], 0
    for prompt in dataset:
        if skips.count(prompt):
            continue
        chunk.append(prompt)
        used += 1
        if len(chunk) == size or used == max_examples:
            yield chunk
            chunk = []
        if used == max_examples:
            return
    if chunk:
        yield chunk


def evaluate_benchmark(
    policy, path: str, builder, config, params, grade, k: int, key: jax.Array, batch_prompts: int, max_examples: int
) -> tuple[dict, list[dict]]:
    """(summary, per-problem results) of one benchmark file."""
    skips = data_lib.SkipCounter()
    results, avg, passed = [], 0.0, 0.0
    for number, chunk in enumerate(prompt_chunks(path, builder, config, batch_prompts, max_examples, skips)):
        summary, chunk_results = evaluate_prompts(
            policy, chunk, k, params, grade, jax.random.fold_in(key, number), batch_prompts=batch_prompts
        )
        # Both metrics are means over problems (all with k responses): chunk means weighted by size.
        avg += summary[f"avg@{k}"] * len(chunk)
        passed += summary[f"pass@{k}"] * len(chunk)
        results += chunk_results
    skipped = sum(skips.counts.values())
    if not results:
        raise InputError(
            f"{path}: none of its {skipped} examples could be used ({dict(skips.counts)}); check the "
            "column names (--problem_key, --answer_key, --images_key) and the warnings above."
        )
    summary = {
        "problems": len(results),
        "skipped": skipped,
        f"avg@{k}": avg / len(results),
        f"pass@{k}": passed / len(results),
    }
    return summary, results


def markdown_table(summary: dict) -> str:
    k = summary["k"]
    lines = [f"| benchmark | problems | skipped | avg@{k} (%) | pass@{k} (%) |", "|---|---|---|---|---|"]
    rows = [(name, s["problems"], s["skipped"], s) for name, s in summary["benchmarks"].items()]
    rows.append(("average", "", "", summary["average"]))
    for name, problems, skipped, s in rows:
        lines.append(f"| {name} | {problems} | {skipped} | {100 * s[f'avg@{k}']:.1f} | {100 * s[f'pass@{k}']:.1f} |")
    return "\n".join(lines)


def evaluate(options: EvalOptions) -> dict:
    names = [benchmark_name(path) for path in options.data]
    if len(set(names)) < len(names):
        raise InputError(f"Benchmark files must have different names (results are written per name): {options.data}")
    run = runs.run_and_step(options.checkpoint, options.step)
    out = options.out or (os.path.join(run[0], EVALUATION_DIR) if run else None)
    if out is None:
        raise InputError(
            "--out is needed with an HF directory or a converted checkpoint (a run's workdir defaults to "
            f"WORKDIR/{EVALUATION_DIR})."
        )
    policy, config, step = load_checkpoint(options.checkpoint, options.step, options.dtype)
    for field in ("problem_key", "answer_key", "images_key"):
        config.data[field] = getattr(options, field) or config.data[field]
    config.rollout.max_new_tokens = options.max_new_tokens or config.rollout.max_new_tokens
    config.reward.name = options.reward or config.reward.name
    d = config.data
    builder = prompt_builder(policy, d.max_prompt_length, d.min_pixels or None, d.max_pixels or None, d.prompt_template)
    params = config_lib.sampling_params(config, builder.special, group_size=options.k, **PAPER_SAMPLING)
    summary = {
        "checkpoint": options.checkpoint,
        "step": step,
        "k": options.k,
        "reward": config.reward.name,
        "sampling": dict(PAPER_SAMPLING, max_new_tokens=params.max_new_tokens),
        "benchmarks": {},
    }
    metrics = (f"avg@{options.k}", f"pass@{options.k}")
    paths.makedirs(out)
    with RewardPool(min(config.reward.workers, os.cpu_count() or 1)) as pool:
        grade = functools.partial(pool.score_responses, reward=config.reward.name, timeout_s=config.reward.timeout_s)
        for name, path in zip(names, options.data):
            # Keyed by name: a benchmark's samples do not depend on which other files are evaluated.
            key = jax.random.fold_in(jax.random.key(options.seed), zlib.crc32(name.encode()))
            result, results = evaluate_benchmark(
                policy,
                path,
                builder,
                config,
                params,
                grade,
                options.k,
                key,
                options.batch_prompts,
                options.max_examples,
            )
            summary["benchmarks"][name] = result
            paths.write_text(os.path.join(out, f"{name}.jsonl"), "".join(json.dumps(r) + "\n" for r in results))
            scores = ", ".join(f"{m} {result[m]:.4f}" for m in metrics)
            print(f"{name}: {scores} on {result['problems']} problems", flush=True)
    benchmarks = summary["benchmarks"].values()
    summary["average"] = {m: sum(b[m] for b in benchmarks) / len(benchmarks) for m in metrics}
    paths.write_json(os.path.join(out, SUMMARY_FILE), summary)
    print(markdown_table(summary))
    return summary
