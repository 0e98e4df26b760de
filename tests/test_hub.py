"""Hugging Face Hub names for models and data, resolved offline from a hub cache laid out by
hand (as `hf download` leaves it) around the tiny test model and task: the resolver, its
errors, and every command that takes a model or data path."""

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from vppo_jax.data import RowSource
from vppo_jax.errors import InputError
from vppo_jax.eval import benchmarks as evaluate
from vppo_jax.io import hub
from vppo_jax.models.qwen2_5_vl import from_pretrained
from vppo_jax.plan import model_config
from vppo_jax.rollout.policy import load_policy

from hub_cache import cache_repo, go_offline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL, DATASET = "vppo-test/tiny-vl", "vppo-test/shapes"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_task) -> dict[str, str]:
    """An HF_HOME whose hub cache holds the tiny model and the task's two files as a dataset:
    {"home", "model" (its snapshot directory), "dataset" (its snapshot directory)}."""
    home = tmp_path_factory.mktemp("hf_home")
    model = tiny_task["model"]
    model_files = {name: os.path.join(model, name) for name in os.listdir(model)}
    data_files = {"data/train.parquet": tiny_task["train"], "data/val.parquet": tiny_task["val"]}
    return {
        "home": str(home),
        "model": cache_repo(home / "hub", "model", MODEL, model_files),
        "dataset": cache_repo(home / "hub", "dataset", DATASET, data_files),
    }


@pytest.fixture
def offline(hf_home, monkeypatch) -> dict[str, str]:
    go_offline(monkeypatch, hf_home["home"])
    return hf_home


def test_hub_names_resolve_offline_from_the_cache(offline, tmp_path, monkeypatch):
    assert hub.resolve_model(MODEL) == offline["model"]
    assert hub.resolve_dataset(DATASET) == offline["dataset"]
    assert hub.resolve_data_file(f"{DATASET}/data/val.parquet") == os.path.join(offline["dataset"], "data/val.parquet")
    assert hub.resolve_model("gs://bucket/model") == "gs://bucket/model"  # URLs are paths, never names
    monkeypatch.chdir(tmp_path)
    os.makedirs(MODEL)
    assert hub.resolve_model(MODEL) == MODEL  # a local directory of that name wins


def test_a_name_that_resolves_nowhere_says_what_was_looked_for_and_where(offline):
    cache = os.path.join(offline["home"], "hub")
    with pytest.raises(hub.HubLookupError) as error:
        hub.resolve_model("vppo-test/missing")
    message = str(error.value)
    assert "'vppo-test/missing' is not a local path" in message and cache in message
    assert "HF_HUB_OFFLINE is set" in message and "`hf download vppo-test/missing`" in message
    with pytest.raises(hub.HubLookupError, match="no complete copy of file 'data/test.parquet' of dataset"):
        hub.resolve_data_file(f"{DATASET}/data/test.parquet")
    with pytest.raises(hub.HubLookupError, match="is not a local path .* and not a Hub name"):
        hub.resolve_model("no such/model")


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    """Paths no Hub name can be stop at once with "no such file", naming the absolute path; an
    attempt to download would fail the test (and without a network take half a minute)."""
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a local path was sent to the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # data/x/train.parquet is local: ./data exists
    for path in ("./train.parquet", "train.parquet", "dir/train.parquet", "data/x/train.parquet", "/no/train.parquet"):
        with pytest.raises(hub.HubLookupError) as error:
            hub.resolve_data_file(path)
        absolute = os.path.abspath(path)
        assert str(error.value) == (
            f"{path}: no such file ({absolute} does not exist); a file of a Hugging Face Hub dataset is named "
            "ORG/NAME/FILE."
        )
        assert isinstance(error.value, InputError)  # the entry points print it as one line, exit status 2
    for path in ("./model", "../model", "/no/such/model"):
        with pytest.raises(hub.HubLookupError, match=r"no such directory \("):
            hub.resolve_model(path)


def test_every_command_takes_hub_names_for_its_model_and_data(offline, tiny_task, tmp_path):
    # The trainer's model (model.path) and data (data.train_files): what it loads them with.
    policy = load_policy(MODEL, "float32")
    expected = nnx.to_flat_state(nnx.state(from_pretrained(tiny_task["model"]), nnx.Param))
    got = dict(nnx.to_flat_state(nnx.state(policy.model, nnx.Param)))
    for key, value in expected:
        np.testing.assert_array_equal(np.asarray(got[key].get_value()), np.asarray(value.get_value()))
    assert len(RowSource([f"{DATASET}/data/train.parquet"], ("problem", "answer", "images"))) == 48
    assert model_config(MODEL, "", "float32") == model_config(tiny_task["model"], "", "float32")  # the planner

    summary = evaluate.evaluate(
        evaluate.EvalOptions(
            checkpoint=MODEL, data=(f"{DATASET}/data/val.parquet",), out=str(tmp_path / "eval"), k=1, dtype="float32"
        )
    )
    assert summary["benchmarks"]["val"]["problems"] == 4

    convert = [sys.executable, "-m", "scripts.convert_hf_to_jax", f"--out={tmp_path / 'converted'}"]
    done = subprocess.run([*convert, f"--hf_dir={MODEL}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "converted")) == ["hf", "params"]
    refused = subprocess.run(
        [*convert, "--hf_dir=vppo-test/missing"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 2
    error = refused.stderr.strip().splitlines()[-1]  # one line, no traceback
    assert error.startswith("error: 'vppo-test/missing' is not a local path") and "HF_HUB_OFFLINE is set" in error
