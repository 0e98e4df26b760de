"""Peak memory of checkpoint conversion, as a ratio to the checkpoint size.

Generates a random bf16 Qwen2.5-VL checkpoint of at least 2 GB (tensor by tensor, so the
generator itself stays small), converts it HF -> orbax and orbax -> HF with the real
scripts in fresh processes, and prints each process's peak RSS / checkpoint bytes.
Target: <= 1.25 in each direction (a 7B checkpoint, 15 GB in bf16, then converts within
24 GiB). The RSS includes the Python + JAX runtime (measured alone and printed too).

    python benchmarks/convert_memory.py [--workdir=/tmp/convert_memory] [--layers=18]
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from absl import app, flags, logging
from flax import nnx

from vppo_jax.io.cli import parse_flags
from vppo_jax.io.safetensors_files import write_sharded
from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from vppo_jax.models.qwen2_5_vl.hf_io import config_to_hf_dict
from vppo_jax.models.qwen2_5_vl.model import abstract_model
from vppo_jax.models.qwen2_5_vl.presets import preset
from vppo_jax.models.qwen2_5_vl.weights import weight_table

TARGET = 1.25


def benchmark_config(layers: int) -> Qwen2_5_VLConfig:
    return preset("medium", text=dict(num_hidden_layers=layers), param_dtype="bfloat16", dtype="bfloat16")


def write_random_checkpoint(config: Qwen2_5_VLConfig, directory: str) -> int:
    """Writes legacy-named bf16 safetensors (5 GB shards like the hub) and config.json."""
    os.makedirs(directory)
    shapes = dict(nnx.to_flat_state(nnx.state(abstract_model(config))))
    specs = []
    for entry in weight_table(config):
        ours = shapes[entry.path].get_value().shape
        for name in entry.hf_names():
            specs.append(
                (name, entry.transform.hf_shape(ours[1:] if entry.layers else ours), np.dtype(ml_dtypes.bfloat16))
            )
    shape_of = {name: shape for name, shape, _ in specs}
    rng = np.random.default_rng(0)

    def produce(name):
        return (rng.standard_normal(shape_of[name], np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    write_sharded(directory, specs, produce, max_shard_bytes=5 * 1024**3)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_to_hf_dict(config) | {"dtype": "bfloat16"}, f)
    return sum(int(np.prod(s[1])) * 2 for s in specs)


def peak_rss_of(command: list[str]) -> tuple[int, float]:
    """Peak RSS in bytes of a fresh child process running `command`, and its wall time."""
    script = (
        "import resource, subprocess, sys;"
        "rc = subprocess.call(sys.argv[1:]);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
        "sys.exit(rc)"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{command} failed:\n{out.stderr}")
    return int(out.stdout.strip().splitlines()[-1]) * 1024, time.perf_counter() - start


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("workdir", None, "Directory for the checkpoints (default: a temporary one, removed after).")
    flags.DEFINE_integer("layers", 18, "Text layers of the random checkpoint (its size).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="convert_memory_")
    try:
        config = benchmark_config(FLAGS.layers)
        source = os.path.join(workdir, "hf_source")
        size = write_random_checkpoint(config, source)
        print(f"checkpoint: {size / 1e9:.2f} GB bf16 ({FLAGS.layers} text layers)")
        runtime, _ = peak_rss_of([sys.executable, "-c", "import jax, orbax.checkpoint, vppo_jax.models.qwen2_5_vl"])
        print(f"python + jax runtime alone: {runtime / 1e9:.2f} GB peak RSS")
        scripts = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts")
        directions = {
            "HF -> JAX": [
                os.path.join(scripts, "convert_hf_to_jax.py"),
                f"--hf_dir={source}",
                f"--out={os.path.join(workdir, 'jax')}",
            ],
            "JAX -> HF": [
                os.path.join(scripts, "convert_jax_to_hf.py"),
                f"--checkpoint={os.path.join(workdir, 'jax')}",
                f"--out={os.path.join(workdir, 'hf_export')}",
            ],
        }
        for label, command in directions.items():
            peak, seconds = peak_rss_of([sys.executable, *command])
            ratio = peak / size
            verdict = "meets" if ratio <= TARGET else "misses"
            print(
                f"{label}: peak RSS {peak / 1e9:.2f} GB = {ratio:.2f} x checkpoint ({verdict} target <= {TARGET}), "
                f"{seconds:.0f} s"
            )
    finally:
        if not FLAGS.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
