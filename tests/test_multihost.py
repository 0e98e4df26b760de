"""Two processes on localhost (jax.distributed, gloo collectives, 2 fake CPU devices each)
train the tiny config for two steps and match one process with the same 4 devices."""

import json
import math
import os
import socket
import subprocess
import sys

from vppo_jax.trainer.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(directory, files: dict, steps: int = 2, every_steps: int = 1) -> str:
    model = files["model"]
    path = directory / "config.py"
    path.write_text(
        "\n".join(
            [
                "from configs import tiny",
                "def get_config(arg=''):",
                "    c = tiny.get_config('test')",
                f"    c.model.path = {model!r}",
                f"    c.data.train_files, c.data.val_files = ({files['train']!r},), ({files['val']!r},)",
                f"    c.train.steps, c.checkpoint.every_steps, c.eval.every_steps = {steps}, {every_steps}, 2",
                "    c.algo.online_filter = False  # a random policy scores 0: keep every group (else no loss)",
                "    c.mesh.data = -1  # all devices: 4 in both runs",
                "    return c",
            ]
        )
        + "\n"
    )
    return str(path)


def launch(config: str, workdir, devices: int, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "vppo_jax.train", f"--config={config}", f"--workdir={workdir}", *flags]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen):
    _, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stderr[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, tiny_task):
    config = write_config(tmp_path, tiny_task)
    port = free_port()
    # Both runs at once (the two processes of the second mostly wait on each other).
    single = launch(config, tmp_path / "single", 4)
    workers = [
        launch(
            config,
            tmp_path / "multi",
            2,
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ]
    for process in [*workers, single]:
        finish(process)

    reference = read_metrics(tmp_path / "single" / "metrics.jsonl")
    multi = read_metrics(tmp_path / "multi" / "metrics.jsonl")  # process 0 writes, process 1 does not
    assert [line["step"] for line in multi] == [0, 1] and "eval/avg@2" in multi[-1]
    assert len({line["entropy"] for line in reference}) == 2  # the first update changed the policy
    for ours, theirs in zip(multi, reference):
        for name, value in theirs.items():
            if not name.startswith("time/"):
                assert math.isclose(ours[name], value, rel_tol=1e-5, abs_tol=1e-6), (ours["step"], name)

    # Each process read only its share of the prompts: 2 of every step's 4.
    data_state = lambda run: json.loads((tmp_path / run / "checkpoints" / "2" / "data" / "metadata").read_text())
    assert data_state("single") == {"processes": [{"next_index": 8}]}
    assert data_state("multi") == {"processes": [{"next_index": 4}, {"next_index": 4}]}
    # The checkpoint was written collectively: each process stored the shards it holds.
    state = tmp_path / "multi" / "checkpoints" / "2" / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state))


def test_bad_process_flags_are_refused(tmp_path):
    process = launch("configs/tiny.py", tmp_path / "run", 1, "--num_processes=2")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    message = "error: --num_processes > 1 needs --coordinator_address (host:port of process 0)."
    assert stderr.strip().splitlines()[-1] == message
