"""Every output in a bucket: the path layer on a disk and in a bucket alike, atomic directories
where there is no rename, checkpoints converted into and out of a bucket, and a sweep whose root,
model and data are all gs:// paths (training, resuming, evaluation, aggregation).

The bucket is an emulated Cloud Storage bucket (tests/fake_bucket.py) that gs:// paths reach
through gcsfs and orbax's tensorstore exactly as they reach a real one."""

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from etils import epath
from flax import nnx
from PIL import Image

from scripts import convert_hf_to_jax, convert_jax_to_hf
from vppo_jax.eval import benchmarks as evaluate
from vppo_jax.io import paths
from vppo_jax.io.atomic_dir import COMPLETE_MARKER, atomic_directory, is_complete
from vppo_jax.io.safetensors_files import CheckpointError
from vppo_jax.models.qwen2_5_vl import from_pretrained
from vppo_jax.models.qwen2_5_vl.checkpoint import open_params
from vppo_jax.sweeps import aggregate, launch
from vppo_jax.sweeps.trials import finished, load_sweep
from vppo_jax.trainer.checkpoints import complete_steps
from vppo_jax.trainer.metrics import read_metrics

from fake_bucket import fake_bucket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bucket():
    with fake_bucket() as url:
        yield url


@pytest.fixture(params=["disk", "bucket"])
def root(request, tmp_path, bucket) -> str:
    return str(tmp_path) if request.param == "disk" else f"{bucket}/{uuid.uuid4().hex}"


def test_paths_behave_alike_on_a_disk_and_in_a_bucket(root, tmp_path_factory):
    path = f"{root}/logs/run.log"
    paths.makedirs(os.path.dirname(path))
    paths.append_text(path, "first\n")
    paths.append_text(path, "second\n")  # a bucket has no append: the object is rewritten
    assert paths.read_text(path) == "first\nsecond\n"
    assert paths.is_file(path) and paths.is_dir(f"{root}/logs") and not paths.exists(f"{root}/nothing")
    paths.write_json(f"{root}/logs/numbers.json", {"a": [1, 2]})
    assert paths.read_json(f"{root}/logs/numbers.json") == {"a": [1, 2]}
    with paths.open_file(path, "rb") as f:
        f.seek(6)
        assert f.read(6) == b"second"

    local = tmp_path_factory.mktemp("tree")
    (local / "sub").mkdir()
    (local / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 1000)
    (local / "top.txt").write_text("top")
    paths.copy_tree(str(local), f"{root}/copy")
    assert paths.listdir(f"{root}/copy") == ["sub", "top.txt"]
    assert paths.read_text(f"{root}/copy/top.txt") == "top"
    with paths.open_file(f"{root}/copy/sub/weights.bin", "rb") as f:
        assert f.read() == bytes(range(256)) * 1000
    paths.remove_tree(f"{root}/copy")
    assert not paths.exists(f"{root}/copy") and paths.listdir(f"{root}/copy") == []
    assert paths.absolute(root) == (os.path.abspath(root) if paths.is_local(root) else root)


def test_a_directory_in_a_bucket_is_complete_only_once_its_marker_is_written(bucket):
    path = f"{bucket}/atomic/out"
    with atomic_directory(path) as directory:
        assert directory == path  # no rename in a bucket: written in place
        paths.write_text(f"{directory}/a.txt", "a")
        assert paths.exists(f"{path}/a.txt") and not is_complete(path)
    assert is_complete(path) and paths.listdir(path) == [COMPLETE_MARKER, "a.txt"]
    with pytest.raises(FileExistsError, match="out already exists; choose a new output path"):
        with atomic_directory(path):
            pass

    failed = f"{bucket}/atomic/failed"
    with pytest.raises(RuntimeError, match="conversion failed"):
        with atomic_directory(failed) as directory:
            paths.write_text(f"{directory}/a.txt", "a")
            raise RuntimeError("conversion failed")
    assert not paths.exists(failed)  # what the failed write had written is removed

    killed = f"{bucket}/atomic/killed"
    paths.write_text(f"{killed}/a.txt", "a")  # what a write killed before its marker leaves
    with pytest.raises(FileExistsError, match="without its completion marker: an interrupted write"):
        with atomic_directory(killed):
            pass


def test_checkpoints_convert_into_and_out_of_a_bucket(bucket, tiny_task):
    local_model = tiny_task["model"]
    converted, exported = f"{bucket}/convert/jax", f"{bucket}/convert/hf"
    assert convert_hf_to_jax.convert(local_model, converted) == 0
    assert convert_jax_to_hf.convert(converted, exported) == 0
    assert is_complete(converted) and is_complete(exported)
    assert paths.listdir(exported) == [
        COMPLETE_MARKER,
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
    ]

    # HF -> JAX -> HF is exact (the export read every parameter of the converted checkpoint from the bucket).
    expected = nnx.to_flat_state(nnx.state(from_pretrained(local_model), nnx.Param))
    got = dict(nnx.to_flat_state(nnx.state(from_pretrained(exported), nnx.Param)))
    for key, value in expected:
        np.testing.assert_array_equal(np.asarray(got[key].get_value()), np.asarray(value.get_value()))

    interrupted = f"{bucket}/convert/interrupted"
    paths.copy_tree(converted, interrupted)
    epath.Path(f"{interrupted}/{COMPLETE_MARKER}").unlink()
    with pytest.raises(CheckpointError, match="is incomplete: its conversion was interrupted"):
        open_params(interrupted)
    assert convert_hf_to_jax.convert(local_model, interrupted) == 2  # and never written over


@pytest.fixture(scope="module")
def bucket_sweep(tmp_path_factory, tiny_task, bucket) -> tuple[str, str]:
    """(sweep file, root): one trial of the tiny test recipe whose model, data and root are in the bucket."""
    assets = f"{bucket}/assets"
    paths.copy_tree(os.path.dirname(tiny_task["model"]), assets)
    directory = tmp_path_factory.mktemp("bucket_sweep")
    config = directory / "config.py"
    config.write_text(
        "from configs import tiny\n"
        "def get_config(arg=''):\n"
        "    c = tiny.get_config('test')\n"
        "    c.train.steps, c.checkpoint.every_steps, c.eval.every_steps = 2, 1, 100\n"
        "    c.rollout.prompts_per_step, c.rollout.group_size, c.rollout.max_new_tokens = 2, 2, 4\n"
        "    c.algo.online_filter = False  # a random policy's groups would all be filtered out\n"
        "    c.reward.workers = 1\n"
        "    return c\n"
    )
    sweep = directory / "in_bucket.py"
    sweep.write_text(
        f"CONFIG = {str(config)!r}\n"
        f"FIXED = {{'model.path': '{assets}/model', 'data.train_files': ('{assets}/train.parquet',),\n"
        f"         'data.val_files': ('{assets}/val.parquet',)}}\n"
        "TRIALS = {'vppo': {}}\n"
        "METRICS = ('entropy', 'benchmarks/val/avg@2')\n"
    )
    return str(sweep), f"{bucket}/sweeps"


def test_a_sweep_trains_resumes_evaluates_and_aggregates_with_every_output_in_a_bucket(
    bucket_sweep, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))  # the resumed run compiles nothing
    sweep_file, root = bucket_sweep
    (trial,) = load_sweep(sweep_file).trials
    workdir = f"{root}/in_bucket/vppo"

    assert launch.launch(sweep_file, root) == 0
    assert finished(workdir) and complete_steps(workdir) == [1, 2]
    assert paths.listdir(workdir) == ["checkpoints", "config.json", "metrics.jsonl", "tensorboard", "train.log"]
    assert "train:" in paths.read_text(f"{workdir}/train.log")  # the trial's output, uploaded when it ended
    first = read_metrics(f"{workdir}/metrics.jsonl")
    assert [line["step"] for line in first] == [0, 1]
    (events,) = paths.listdir(f"{workdir}/tensorboard")
    with paths.open_file(f"{workdir}/tensorboard/{events}", "rb") as f:
        assert b"entropy" in f.read()  # the spooled event file reached the bucket
    assert launch.launch(sweep_file, root) == 0
    assert "finished before, skipped" in capsys.readouterr().out

    # One more step: the run resumes from its checkpoint in the bucket and appends to its metrics.
    command = [sys.executable, *trial.train_args(workdir), "--config.train.steps=3"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = read_metrics(f"{workdir}/metrics.jsonl")
    assert resumed[:2] == first and resumed[2]["step"] == 2  # steps 0 and 1 were not run again
    assert complete_steps(workdir) == [1, 2, 3] and len(paths.listdir(f"{workdir}/tensorboard")) == 2

    benchmark = trial.overrides["data.val_files"][0]
    summary = evaluate.evaluate(evaluate.EvalOptions(checkpoint=workdir, data=[benchmark], k=2))
    assert summary["step"] == 3 and paths.read_json(f"{workdir}/evaluation/summary.json") == summary
    assert len(paths.read_text(f"{workdir}/evaluation/val.jsonl").splitlines()) == 4  # tiny_task's validation rows

    (row,) = aggregate.aggregate(sweep_file, root)
    assert row["status"] == "finished" and row["steps"] == 3 and row["entropy"] == resumed[-1]["entropy"]
    assert row["benchmarks/val/avg@2"] == summary["average"]["avg@2"]
    assert paths.listdir(f"{root}/in_bucket") == ["entropy.png", "results.csv", "results.md", "vppo"]
    with paths.open_file(f"{root}/in_bucket/entropy.png", "rb") as f, Image.open(f) as plot:
        assert plot.format == "PNG"
