"""Shared test setup: fp32 matmuls on CPU, eight fake devices for sharding tests, and the tiny
task and model that the trainer, multi-host and sweep tests run on."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

from vppo_jax.demo import synthetic  # noqa: E402
from vppo_jax.demo.tiny_model import write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> dict[str, str]:
    """A small synthetic task (48 training and 4 validation rows) and a tiny random model with
    its tokenizer: {"model", "train", "val"} paths, made once per test session."""
    directory = tmp_path_factory.mktemp("tiny_task")
    files = synthetic.write_splits(str(directory), train=48, val=4, seed=0)
    model = write_tiny_model(str(directory / "model"), synthetic.tokenizer_corpus(files["train"]))
    return {"model": model, **files}
