"""Exports a training run, or a converted checkpoint, as a Hugging Face Qwen2.5-VL directory.

    python scripts/convert_jax_to_hf.py --checkpoint=runs/vppo_7b --out=/path/hf_export [--step=N] [--dtype=bfloat16]
    python scripts/convert_jax_to_hf.py --checkpoint=/path/qwen7b_jax --out=/path/hf_export

--checkpoint is a training run's workdir (its latest finished step, or --step), one of its
checkpoint directories (WORKDIR/checkpoints/STEP), or a directory written by
scripts/convert_hf_to_jax.py. Only the parameters are read, one at a time: a run's optimizer
state never is. The output loads with transformers' from_pretrained, AutoTokenizer and
AutoProcessor: config.json, legacy-named safetensors (sharded with an index above
--max_shard_gb), and the tokenizer and processor files of the model the run started from, in
--dtype (default: the dtype the checkpoint holds, a run's parameter dtype). It appears only
when complete. Either path may be in a bucket (gs://...). Bad input (not a run nor a
checkpoint, a step the run has no checkpoint of, an existing --out) is one error line and
exit status 2.
"""

import os

from absl import flags, logging

from vppo_jax.errors import InputError
from vppo_jax.eval import runs
from vppo_jax.io import paths
from vppo_jax.io.cli import run_conversion, run_program
from vppo_jax.models.qwen2_5_vl.checkpoint import PARAMS_DIR, open_params
from vppo_jax.models.qwen2_5_vl.config import DTYPES
from vppo_jax.models.qwen2_5_vl.hf_io import write_hf_directory

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string(
        "checkpoint", None, "A training run's workdir, one of its checkpoints, or a convert_hf_to_jax.py output."
    )
    flags.DEFINE_string("out", None, "Output HF directory (must not exist).")
    flags.DEFINE_integer("step", None, "With a run: the step to export (default: the latest finished one).")
    flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors shard, in GiB.")
    flags.DEFINE_enum("dtype", None, sorted(DTYPES), "Dtype of the exported tensors (default: as stored).")
    flags.mark_flags_as_required(["checkpoint", "out"])


def open_checkpoint(path: str, step: int | None, dtype: str | None):
    """(config, {parameter path: (shape, dtype)}, load) of what --checkpoint names; `load(p)`
    reads one parameter, in `dtype` (default: as stored)."""
    run = runs.run_and_step(path, step)
    if run:
        config, shapes, load, step = runs.open_run_params(*run, dtype)
        print(f"step {step} of {run[0]}", flush=True)
        return config, shapes, load
    if not paths.exists(path):
        raise InputError(f"--checkpoint={path} does not exist.")
    if not paths.is_dir(os.path.join(path, PARAMS_DIR)):
        raise InputError(
            f"--checkpoint={path} is neither a training run's workdir (config.json + checkpoints/), one of its "
            f"checkpoints (WORKDIR/checkpoints/STEP), nor a checkpoint written by scripts/convert_hf_to_jax.py "
            f"({PARAMS_DIR}/ + hf/)."
        )
    if step is not None:
        raise InputError(f"--step={step} needs a training run's workdir; {path} is a converted checkpoint.")
    return open_params(path, dtype)


def convert(
    checkpoint: str, out: str, max_shard_gb: float = 5.0, dtype: str | None = None, step: int | None = None
) -> int:
    """The export; bad input is one error line and exit status 2 (vppo_jax.io.cli.run_conversion)."""

    def work():
        write_hf_directory(*open_checkpoint(checkpoint, step, dtype), out, int(max_shard_gb * 1024**3))

    return run_conversion(work, out)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    return convert(FLAGS.checkpoint, FLAGS.out, FLAGS.max_shard_gb, FLAGS.dtype, FLAGS.step)


if __name__ == "__main__":
    define_flags()
    run_program(main)
