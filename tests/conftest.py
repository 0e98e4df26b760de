"""Shared test setup: fp32 matmuls on CPU, eight fake devices for sharding tests, and the tiny
task and model that the trainer, multi-host and sweep tests run on."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

from vppo_jax.embedded import synthetic  # noqa: E402
from vppo_jax.embedded.tiny_model import write_tiny_model  # noqa: E402

from hf_reference import load_port, tiny_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_model():
    """transformers' tiny random Qwen2.5-VL (tests/hf_reference.py), the reference of the port tests."""
    return tiny_hf_model(seed=0)


@pytest.fixture(scope="session")
def port(hf_model, tmp_path_factory):
    """Our port of `hf_model`, loaded from its saved HF directory."""
    return load_port(hf_model, tmp_path_factory.mktemp("port"))


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> dict[str, str]:
    """A small synthetic task (48 training and 4 validation rows) and a tiny random model with
    its tokenizer: {"model", "train", "val"} paths, made once per test session."""
    directory = tmp_path_factory.mktemp("tiny_task")
    files = synthetic.write_splits(str(directory), train=48, val=4, seed=0)
    model = write_tiny_model(str(directory / "model"), synthetic.tokenizer_corpus(files["train"]))
    return {"model": model, **files}
