"""Preemption: SIGTERM or SIGINT stops the trainer after the step in flight with that step
checkpointed, its reward workers stopped and exit status 75; the restart resumes there and its
metrics are an uninterrupted run's. With two processes, a notice to one stops both after the
same step (JAX's preemption sync point)."""

import math
import os
import signal
import subprocess
import time

import pytest
from test_multihost import free_port, launch
from test_multihost import write_config as write_multihost_config
from test_train import ROOT, deterministic, run, train_command, write_config

from vppo_jax.trainer.metrics import read_metrics
from vppo_jax.trainer.preemption import PreemptionWatch

PREEMPTED = 75
# No online filter: a random policy scores 0, and the entropy term must still move the parameters
# so that every later step depends on the restored state. Checkpoints only at the end: the one a
# signal asks for is the only other one.
OVERRIDES = {"train.steps": 4, "checkpoint.every_steps": 100, "algo.online_filter": False}


@pytest.fixture(scope="module")
def config(tiny_task, tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("preemption") / "config.py", tiny_task, **OVERRIDES)


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run(config, workdir)
    lines = deterministic(read_metrics(workdir / "metrics.jsonl"))
    assert len({line["entropy"] for line in lines}) > 1  # the state changes from step to step
    return lines


def reward_workers(pid: int) -> list[int]:
    """The processes that `pid` started with multiprocessing's spawn (its reward workers), not
    multiprocessing's resource tracker, which exits only after its parent has (a moment later)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    spawned = b"spawn_main" in f.read()
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid and spawned:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_lines(path, count: int, process: subprocess.Popen, timeout_s: float = 600):
    deadline = time.time() + timeout_s
    while not (path.exists() and len(read_metrics(path)) >= count):
        assert process.poll() is None and time.time() < deadline, "the run ended before it was signalled"
        time.sleep(0.05)


def test_a_signal_is_noted_and_a_second_one_obeyed():
    """Inside the watch Ctrl-C raises nothing until it comes twice (the run below shows SIGTERM's
    whole path: the same handler); outside it the previous handlers are back."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with PreemptionWatch() as watch:
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.signal_name == "SIGINT" and watch.stop_after(3) == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_signal_mid_step_loses_no_finished_step(tmp_path, config, uninterrupted):
    signum = signal.SIGTERM
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        train_command(config, workdir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_lines(workdir / "metrics.jsonl", 1, process)  # step 0 written: step 1 is in flight
    workers = reward_workers(process.pid)
    assert workers  # the reward pool's
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    done = len(read_metrics(workdir / "metrics.jsonl"))
    # Step 1 was in flight (then it finished), or the signal came between steps 0 and 1 (then
    # nothing was in flight): either way every finished step is kept and the run stopped early.
    assert 1 <= done < 4
    assert stderr.strip().splitlines()[-1] == (
        f"preempted: {signal.Signals(signum).name} after step {done - 1} ({done} of 4 steps done); checkpoint "
        f"{done} written in {workdir / 'checkpoints'}: rerun the same command to resume"
    )
    assert os.listdir(workdir / "checkpoints") == [str(done)]
    assert not os.path.exists(workdir / "lock.json")  # the workdir is free again
    assert not [pid for pid in workers if alive(pid)]  # the reward workers stopped with it

    run(config, workdir)
    assert deterministic(read_metrics(workdir / "metrics.jsonl")) == uninterrupted


def test_a_notice_to_one_of_two_processes_stops_both_after_the_same_step(tmp_path, tiny_task):
    config = write_multihost_config(tmp_path, tiny_task, steps=4, every_steps=100)
    workdir = tmp_path / "multi"

    def start_both():
        port = free_port()
        flags = [f"--coordinator_address=localhost:{port}", "--num_processes=2"]
        return [launch(config, workdir, 2, *flags, f"--process_id={i}") for i in range(2)]

    single = launch(config, tmp_path / "single", 4)  # the reference, meanwhile
    workers = start_both()
    wait_for_lines(workdir / "metrics.jsonl", 1, workers[0])
    workers[1].send_signal(signal.SIGTERM)  # to process 1 only: process 0 hears of it through JAX
    outputs = [process.communicate(timeout=400)[1] for process in workers]
    assert [process.returncode for process in workers] == [PREEMPTED] * 2, outputs[0][-2000:] + outputs[1][-2000:]
    done = len(read_metrics(workdir / "metrics.jsonl"))
    assert 1 <= done < 4  # as in the test above
    for stderr in outputs:  # both name the same step
        assert stderr.strip().splitlines()[-1].startswith(f"preempted: SIGTERM after step {done - 1} ({done} of 4")
    assert os.listdir(workdir / "checkpoints") == [str(done)]
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(workdir / "checkpoints" / str(done) / "state"))

    for process in start_both():
        _, stderr = process.communicate(timeout=400)
        assert process.returncode == 0, stderr[-3000:]
    _, stderr = single.communicate(timeout=400)
    assert single.returncode == 0, stderr[-3000:]
    reference = read_metrics(tmp_path / "single" / "metrics.jsonl")
    resumed = read_metrics(workdir / "metrics.jsonl")
    assert [line["step"] for line in resumed] == [0, 1, 2, 3]
    for ours, theirs in zip(resumed, reference):
        for name, value in theirs.items():
            if not name.startswith("time/"):
                assert math.isclose(ours[name], value, rel_tol=1e-5, abs_tol=1e-6), (ours["step"], name)
