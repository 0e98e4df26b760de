"""Sweeps: a 2 x 2 grid of the tiny config run locally (a failed trial does not stop the others,
finished trials are skipped on relaunch), the aggregated table against each trial's own
metrics, the pod launcher's commands, and a finished trial evaluated from its workdir."""

import ast
import csv
import itertools
import json
import shlex
import shutil
import sys

import pytest
from PIL import Image

from configs import tiny
from vppo_jax.eval import benchmarks as evaluate
from vppo_jax.sweeps import aggregate, launch
from vppo_jax.sweeps.trials import finished, load_sweep, trial_name
from vppo_jax.trainer.checkpoints import claim_workdir

# Seeds change what is sampled but not what is compiled: with a shared compilation cache,
# only the first trial compiles.
GRID = {"train.seed": (0, 1), "data.seed": (1, 2)}
METRICS = ["entropy", "loss", "rollout/response_length"]


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory, tiny_task):
    """A tiny model and task, a config file on the test recipe, and a sweep file over it whose
    FIXED overrides name the assets (tuples of paths go through the command line)."""
    directory = tmp_path_factory.mktemp("sweep")
    files, model = tiny_task, tiny_task["model"]
    config = directory / "config.py"
    config.write_text(
        "\n".join(
            [
                "from configs import tiny",
                "def get_config(arg=''):",
                "    c = tiny.get_config('test')",
                "    c.train.steps, c.eval.every_steps = 1, 100",
                "    c.rollout.prompts_per_step, c.rollout.group_size, c.rollout.max_new_tokens = 2, 2, 4",
                "    c.algo.online_filter = False  # a random policy's groups would all be filtered out",
                "    c.reward.workers = 1",
                "    return c",
            ]
        )
        + "\n"
    )
    sweep = directory / "seeds.py"
    sweep.write_text(
        "\n".join(
            [
                f"CONFIG = {str(config)!r}",
                f"FIXED = {{'model.path': {model!r}, 'data.train_files': ({files['train']!r},),",
                f"         'data.val_files': ({files['val']!r},)}}",
                f"GRID = {GRID!r}",
                f"METRICS = {tuple(METRICS)!r}",
            ]
        )
        + "\n"
    )
    return str(sweep)


def test_the_pod_dry_run_prints_one_gcloud_command_per_trial(sweep_file, capsys):
    repo = "code/vppo jax"  # a space: the command must quote it
    assert (
        launch.launch(sweep_file, "sweeps", mode="tpu-pod", pod="my-pod", zone="us-east5-a", repo=repo, dry_run=True)
        == 0
    )
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    sweep = load_sweep(sweep_file)
    assert len(commands) == 4
    seen = set()
    for command in commands:
        assert command[:8] == [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            "my-pod",
            "--zone=us-east5-a",
            "--worker=all",
        ]
        assert command[8].startswith("--command=") and len(command) == 9
        remote = shlex.split(command[8].removeprefix("--command="))
        assert remote[:6] == ["cd", repo, "&&", "python3", "-m", "vppo_jax.train"]
        flags = dict(arg.removeprefix("--").split("=", 1) for arg in remote[6:])
        assert flags["config"] == sweep.trials[0].config
        values = {field: ast.literal_eval(flags[f"config.{field}"]) for field in GRID}
        assert flags["workdir"] == f"sweeps/seeds/{trial_name(values)}"
        assert ast.literal_eval(flags["config.data.train_files"]) == sweep.trials[0].overrides["data.train_files"]
        seen.add(tuple(values.values()))
    assert seen == set(itertools.product(*GRID.values()))


def test_a_local_sweep_runs_skips_reports_failures_and_aggregates(sweep_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))  # inherited by the trials
    sweep = load_sweep(sweep_file)
    root = tmp_path / "sweeps"
    workdirs = {trial.name: sweep.workdir(str(root), trial) for trial in sweep.trials}
    broken = sweep.trials[0].name
    claim_workdir(workdirs[broken], tiny.get_config("test"))  # the trainer refuses a workdir of another config

    assert launch.launch(sweep_file, str(root)) == 1
    out = capsys.readouterr().out
    assert f"{broken}: FAILED" in out and "holds a run of another config" in out
    assert [finished(w) for w in workdirs.values()] == [False, True, True, True]

    shutil.rmtree(workdirs[broken])
    assert launch.launch(sweep_file, str(root)) == 0
    out = capsys.readouterr().out
    assert out.count("finished before, skipped") == 3 and f"{broken}: done" in out
    assert all(finished(w) for w in workdirs.values())

    aggregate.aggregate(sweep_file, str(root))
    with open(root / "seeds" / "results.csv") as f:
        rows = {row["trial"]: row for row in csv.DictReader(f)}
    markdown = (root / "seeds" / "results.md").read_text()
    assert sorted(rows) == sorted(workdirs)
    for name, workdir in workdirs.items():
        with open(f"{workdir}/config.json") as f:
            config = json.load(f)  # what the trainer ran: the overrides reached it
        with open(f"{workdir}/metrics.jsonl") as f:
            (final,) = [json.loads(line) for line in f]  # one step
        row = rows[name]
        assert {field: int(row[field]) for field in GRID} == {
            field: config[section][key] for field in GRID for section, key in [field.split(".")]
        }
        assert row["status"] == "finished" and row["steps"] == "1"
        assert {metric: float(row[metric]) for metric in METRICS} == {metric: final[metric] for metric in METRICS}
        assert f"| {name} | " + " | ".join(row[field] for field in GRID) in markdown
    assert len({row["entropy"] for row in rows.values()}) > 1  # the trials differ: a real check of which is which
    with Image.open(root / "seeds" / "entropy.png") as plot:
        assert plot.format == "PNG" and plot.width > 100

    # The finished trial's workdir evaluates as a checkpoint (the trainer's own orbax state).
    name = sweep.trials[1].name
    summary = evaluate.evaluate(
        evaluate.EvalOptions(checkpoint=workdirs[name], data=[sweep.trials[1].overrides["data.val_files"][0]], k=2)
    )
    assert summary["step"] == 1 and summary["benchmarks"]["val"]["problems"] == 4  # tiny_task's validation rows


def test_a_preempted_trial_runs_again_from_its_checkpoint(sweep_file, tmp_path, monkeypatch, capsys):
    # A stand-in for the trainer: preempted (exit status 75) on its first run, done on its second.
    trial = (
        "import pathlib, sys; runs = pathlib.Path(sys.argv[1], 'runs'); "
        "runs.parent.mkdir(parents=True, exist_ok=True); "
        "before = len(runs.read_text()) if runs.exists() else 0; runs.write_text('x' * (before + 1)); "
        "sys.exit(75 if before == 0 else 0)"
    )
    monkeypatch.setattr(launch, "local_command", lambda _, workdir: [sys.executable, "-c", trial, workdir])
    assert launch.launch(sweep_file, str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count("preempted: running it again from its checkpoint") == 4
    assert "FAILED" not in out
    sweep = load_sweep(sweep_file)
    assert [(tmp_path / sweep.name / t.name / "runs").read_text() for t in sweep.trials] == ["xx"] * 4

    # Preempted every time: given up after MAX_PREEMPTED_RERUNS reruns, reported as failed.
    monkeypatch.setattr(launch, "local_command", lambda *_: [sys.executable, "-c", "import sys; sys.exit(75)"])
    assert launch.launch(sweep_file, str(tmp_path / "again")) == 1
    out = capsys.readouterr().out
    assert out.count("preempted: running it again") == 4 * launch.MAX_PREEMPTED_RERUNS
    assert out.count("FAILED (exit status 75)") == 4
