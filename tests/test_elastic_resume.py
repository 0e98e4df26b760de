"""Elastic resume: a checkpoint written on 8 devices resumes on 4, and one written on 4 resumes
on 8, each with the parameters and optimizer state laid out for the new mesh; the resumed steps'
metrics are those of a run that never changed (within float tolerance: the devices sum in
another order)."""

import math
import shutil

import jax
import pytest
from test_train import deterministic

from configs import tiny
from vppo_jax.trainer.metrics import read_metrics
from vppo_jax.trainer.trainer import Trainer


def train(tiny_task, workdir, devices: int, steps: int) -> Trainer:
    config = tiny.get_config("test")
    config.model.path = tiny_task["model"]
    config.data.train_files, config.data.val_files = (tiny_task["train"],), (tiny_task["val"],)
    config.train.steps, config.checkpoint.every_steps = steps, 1
    config.algo.online_filter = False  # a random policy scores 0: keep every group (else no update)
    config.mesh.data = devices  # the first `devices` of the 8 fake ones
    trainer = Trainer(config, str(workdir))
    trainer.train()
    return trainer


def mesh_devices(trainer: Trainer) -> set[int]:
    return {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(trainer.state.params)}


def assert_close(resumed: list[dict], reference: list[dict]):
    assert [line["step"] for line in resumed] == [line["step"] for line in reference]
    for ours, theirs in zip(resumed, reference):
        assert ours.keys() == theirs.keys()
        for name, value in theirs.items():
            assert math.isclose(ours[name], value, rel_tol=1e-4, abs_tol=1e-5), (ours["step"], name, ours[name], value)


def test_checkpoints_resume_on_another_number_of_devices(tmp_path, tiny_task):
    straight = train(tiny_task, tmp_path / "straight", devices=8, steps=4)
    reference = deterministic(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    assert len({line["entropy"] for line in reference}) > 1  # the state changes from step to step

    # 8 -> 4: the straight run's checkpoint 2 (written on 8 devices) resumes on 4 for step 2.
    shutil.copytree(tmp_path / "straight", tmp_path / "on4")
    for step in ("3", "4"):
        shutil.rmtree(tmp_path / "on4" / "checkpoints" / step)
    on4 = train(tiny_task, tmp_path / "on4", devices=4, steps=3)
    assert on4.start_step == 2 and mesh_devices(on4) == {4} and mesh_devices(straight) == {8}
    assert_close(deterministic(read_metrics(tmp_path / "on4" / "metrics.jsonl")), reference[:3])

    # 4 -> 8: its checkpoint 3 (written on 4 devices) resumes on 8 for step 3.
    on8 = train(tiny_task, tmp_path / "on4", devices=8, steps=4)
    assert on8.start_step == 3 and mesh_devices(on8) == {8}
    assert_close(deterministic(read_metrics(tmp_path / "on4" / "metrics.jsonl")), reference)


@pytest.fixture(autouse=True)
def _eight_devices():
    assert jax.device_count() == 8  # tests/conftest.py's fake devices
