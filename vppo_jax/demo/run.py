"""The embedded default end to end: warm start, VPPO and GRPO runs of equal budget, a report.

    python -m vppo_jax.demo --config=configs/tiny.py --workdir=runs/tiny

1. the synthetic task, the tiny model and its supervised warm start (vppo_jax/embedded/assets.py),
   made once in workdir/embedded;
2. the warm start's validation accuracy (cached in workdir/embedded/warm_start_eval.json);
3. one training run per method in `config.demo.methods`, each in workdir/<method>: "vppo"
   is the config as given, "grpo" the same recipe with algo.vppo=False (no token
   dependency, no advantage shaping, no token filtering; same sampling, clipping, budget);
4. token dependency of responses sampled from the first method's final policy;
5. the report in workdir/report (vppo_jax/demo/report.py).

Every stage resumes: a killed demo, run again with the same flags, picks up where it stopped.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np
import pyarrow.parquet as pq

from vppo_jax.demo.report import DependencySample, write_report
from vppo_jax.embedded.assets import prepare_embedded_default
from vppo_jax.io import paths
from vppo_jax.rollout.groups import sample_and_grade, train_batch
from vppo_jax.rollout.rewards import RewardPool
from vppo_jax.trainer.metrics import METRICS_FILE, read_metrics
from vppo_jax.trainer.trainer import Trainer

METHODS = ("vppo", "grpo")


def method_config(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    if method not in METHODS:
        raise ValueError(f"demo.methods holds {method!r}; choose from {METHODS}.")
    config = ml_collections.ConfigDict(config.to_dict())
    config.algo.vppo = method == "vppo"
    return config


def warm_start_accuracy(trainer: Trainer, path: str) -> float:
    """The trainer's validation metric before its first update, computed once and cached."""
    metric = f"eval/avg@{trainer.config.eval.k}"
    if paths.exists(path):
        cached = paths.read_json(path)
        if metric in cached:
            return cached[metric]
    if trainer.start_step:
        raise ValueError(
            f"{path} is missing but {trainer.workdir} has already trained: the warm start's "
            "accuracy can no longer be measured there. Use a new --workdir."
        )
    summary = trainer.evaluate(jax.random.key(trainer.config.train.seed))
    paths.write_json(path, summary, indent=None)
    return summary[metric]


def accuracy_curve(workdir: str, metric: str) -> list[tuple[int, float]]:
    """(RL steps done, validation metric) at every evaluation of a run."""
    lines = read_metrics(os.path.join(workdir, METRICS_FILE))
    return [(line["step"] + 1, line[metric]) for line in lines if line.get(metric) is not None]


def dependency_samples(trainer: Trainer, count: int, key: jax.Array) -> list[DependencySample]:
    """Responses sampled from the trainer's current policy for its first `count` validation
    problems, each token with its visual dependency under the VPPO estimator of the config."""
    config, policy = trainer.config, trainer.current_policy()
    prompts = trainer.validation_prompts[:count]
    sample_key, score_key = jax.random.split(key)
    keys = jax.random.split(sample_key, len(prompts) * trainer.sampling.group_size)
    with RewardPool(1) as pool:
        grade = lambda texts, answers: pool.score_responses(texts, answers, config.reward.name, config.reward.timeout_s)
        groups, _ = sample_and_grade(policy, prompts, keys, trainer.sampling, grade, policy.model.config.image_token_id)
    batch = train_batch(policy.model.config, groups, np.zeros(len(groups.texts), np.float32))
    # Scored as VPPO would score them, whichever method trained the policy.
    dependency = np.asarray(trainer.token_dependency(batch, score_key)[0])
    targets, mask = np.asarray(batch.targets[0]), np.asarray(batch.response_mask[0])
    rows = _validation_rows(config)
    samples = []
    for r in range(len(groups.texts)):
        prompt = groups.prompts[r // groups.group_size]
        row = rows[prompt.index]
        samples.append(
            DependencySample(
                problem=row[config.data.problem_key],
                answer=prompt.answer,
                image_png=row[config.data.images_key][0]["bytes"] if row[config.data.images_key] else None,
                tokens=[policy.tokenizer.decode([int(t)]) for t in targets[r][mask[r]]],
                dependency=dependency[r][mask[r]],
                reward=float(groups.rewards[r]),
            )
        )
    return samples


def _validation_rows(config) -> list[dict]:
    d = config.data
    columns = [d.problem_key, d.images_key]
    return [row for f in d.val_files for row in pq.read_table(paths.open_file(f, "rb"), columns=columns).to_pylist()]


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Runs the stages of the module docstring; returns the path of the report's markdown."""
    start = time.perf_counter()
    if "demo" not in config:
        raise ValueError("the config has no `demo` section (methods, report_prompts): use configs/tiny.py.")
    config = prepare_embedded_default(config, workdir)
    metric = f"eval/avg@{config.eval.k}"
    trainers, warm_start = {}, None
    for method in config.demo.methods:
        trainer = Trainer(method_config(config, method), os.path.join(workdir, method))
        if warm_start is None:
            warm_start = warm_start_accuracy(trainer, os.path.join(workdir, "embedded", "warm_start_eval.json"))
            print(f"warm start: {metric} = {100 * warm_start:.1f}%")
        print(f"training {method} in {trainer.workdir}")
        trainer.train()
        trainers[method] = trainer
    curves = {method: accuracy_curve(trainer.workdir, metric) for method, trainer in trainers.items()}
    first = trainers[config.demo.methods[0]]
    samples = dependency_samples(first, config.demo.report_prompts, jax.random.key(config.train.seed + 1))
    path = write_report(
        os.path.join(workdir, "report"),
        curves,
        warm_start,
        metric.removeprefix("eval/"),
        samples,
        time.perf_counter() - start,
    )
    print(paths.read_text(path).split("\n![")[0])
    return path
