"""A run's workdir: one run at a time (a lock, or a lease in a bucket), an unrestorable newest
checkpoint set aside for the one before it, and a failed checkpoint write that stops the run."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from test_train import ROOT, run, train_command, write_config

from vppo_jax.io import paths
from vppo_jax.trainer import workdir_lock
from vppo_jax.trainer.checkpoints import complete_steps
from vppo_jax.trainer.metrics import read_metrics
from vppo_jax.trainer.workdir_lock import WorkdirLock, WorkdirLockedError

from fake_bucket import fake_bucket


def dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_holder(workdir, **fields):
    now = time.time()
    holder = dict(pid=os.getpid(), host=socket.gethostname(), started=now, heartbeat=now, token="theirs") | fields
    (workdir / "lock.json").write_text(json.dumps(holder))


def test_a_second_lock_is_refused_until_the_first_is_released(tmp_path):
    first = WorkdirLock(str(tmp_path))
    first.acquire()
    holder = f"in use by the run of process {os.getpid()} on {socket.gethostname()}"
    with pytest.raises(WorkdirLockedError, match=holder):
        WorkdirLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / "lock.json").exists()
    second = WorkdirLock(str(tmp_path))
    second.acquire()
    second.release()


@pytest.mark.parametrize(
    "holder, taken",
    [
        (dict(pid=None), True),  # this host, its process gone (pid filled in below)
        (dict(host="elsewhere", heartbeat=time.time() - 2 * workdir_lock.LEASE_S), True),  # no heartbeat
        (dict(host="elsewhere"), False),  # another host, a fresh heartbeat: it may run
    ],
    ids=["dead_process", "old_heartbeat", "live_elsewhere"],
)
def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path, holder, taken, capsys):
    write_holder(tmp_path, **(holder | ({"pid": dead_pid()} if holder.get("pid", 0) is None else {})))
    lock = WorkdirLock(str(tmp_path))
    if not taken:
        with pytest.raises(WorkdirLockedError, match="on elsewhere, running since"):
            lock.acquire()
        assert json.loads((tmp_path / "lock.json").read_text())["token"] == "theirs"
        return
    lock.acquire()
    assert "taking over the workdir lock of process" in capsys.readouterr().err
    assert json.loads((tmp_path / "lock.json").read_text())["token"] == lock.holder.token
    lock.release()


def test_a_lease_in_a_bucket(monkeypatch):
    monkeypatch.setattr(workdir_lock, "SETTLE_S", 0.2)
    with fake_bucket() as bucket:
        workdir = f"{bucket}/run"
        first = WorkdirLock(workdir)
        first.acquire()
        assert paths.read_json(f"{workdir}/lock.json")["pid"] == os.getpid()
        with pytest.raises(WorkdirLockedError, match=f"{workdir} is in use by the run of process {os.getpid()}"):
            WorkdirLock(workdir).acquire()
        first.release()
        assert not paths.exists(f"{workdir}/lock.json")
        WorkdirLock(workdir).acquire()


def test_a_heartbeat_renews_the_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    written = json.loads((tmp_path / "lock.json").read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads((tmp_path / "lock.json").read_text())["heartbeat"] > written
    lock.release()


def test_the_trainer_refuses_a_workdir_in_use_with_one_line(tmp_path, tiny_task):
    config = write_config(tmp_path / "config.py", tiny_task, **{"train.steps": 1})
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_holder(workdir)  # held by this test's process: alive
    out = subprocess.run(train_command(config, workdir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: {workdir} is in use by the run of process {os.getpid()} on {socket.gethostname()}, running since"
        )
    )
    assert not (workdir / "config.json").exists()


def with_file_size_limit(limit: int, command: list[str]) -> list[str]:
    """`command` in a Python that no file may grow past `limit` bytes in (a write that would fails
    with EFBIG, as one on a full disk fails with ENOSPC); set there, then exec'd into the command."""
    setup = (
        "import os, resource, signal, sys; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "  # the write fails instead of killing the process
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", setup, *command]


def test_an_unrestorable_checkpoint_is_set_aside_and_a_failed_write_stops_the_run(tmp_path, tiny_task):
    overrides = {"train.steps": 2, "checkpoint.every_steps": 1, "algo.online_filter": False}
    run(write_config(tmp_path / "config.py", tiny_task, **overrides), tmp_path / "run")
    workdir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    first = read_metrics(workdir / "metrics.jsonl")
    data_files = [os.path.join(d, f) for d, _, files in os.walk(checkpoints / "2" / "state") for f in files]
    largest = max(data_files, key=os.path.getsize)
    cut = os.path.getsize(largest) // 2
    os.truncate(largest, cut)  # a data file cut short, as by a crash of the disk

    # Three steps now, and no file may grow past 1 MB: the 5 MB checkpoint cannot be written.
    config = write_config(tmp_path / "config.py", tiny_task, **(overrides | {"train.steps": 3}))
    command = with_file_size_limit(1 << 20, train_command(config, workdir))
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    # orbax and TensorStore log the failure of their threads with tracebacks (a task whose error
    # nobody retrieved may be logged as late as the interpreter's exit); ours is the one error line.
    assert out.returncode == 4, out.stderr[-3000:]
    aside = workdir / "unrestorable_checkpoints" / "2"
    assert "checkpoint 2 cannot be restored (" in out.stderr
    assert f"): resuming from checkpoint 1; it is kept in {aside}" in out.stderr
    assert os.path.getsize(aside / os.path.relpath(largest, checkpoints / "2")) == cut  # kept as it was
    (ours,) = re.findall(r"error: checkpoint \d+ could not be written .*", out.stderr)  # once, whole
    assert ours.startswith(f"error: checkpoint 2 could not be written to {checkpoints} (")
    assert "File too large" in ours and "Checkpoints [1] are kept" in ours, ours
    # It stopped at the first step boundary after the failure: step 1 (done again from checkpoint 1)
    # and at most step 2, in flight while checkpoint 2 was being written in the background.
    assert [line["step"] for line in read_metrics(workdir / "metrics.jsonl")] in ([0, 1], [0, 1, 2])
    assert complete_steps(str(workdir)) == [1]  # the one before the failure, intact

    run(config, workdir)  # with room again: resumes from checkpoint 1
    lines = read_metrics(workdir / "metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 1, 2]
    redone = {k: v for k, v in lines[1].items() if not k.startswith("time/")}
    assert redone == {k: v for k, v in first[1].items() if not k.startswith("time/")}  # step 1 redone exactly
    assert sorted(os.listdir(checkpoints)) == ["1", "2", "3"]
