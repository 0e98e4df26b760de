"""Converts a Hugging Face Qwen2.5-VL directory into an orbax checkpoint training can start from.

    python scripts/convert_hf_to_jax.py --hf_dir=Qwen/Qwen2.5-VL-7B-Instruct --out=/path/qwen7b_jax [--dtype=bfloat16]

--hf_dir is a directory (local or gs://...) or a Hugging Face Hub name; --out may be in a
bucket. Tensors stream one at a time from the safetensors files, so a 7B checkpoint (15 GB
in bf16) converts on a 24 GiB machine. The output appears only when complete
(vppo_jax/io/atomic_dir.py: what that means in a bucket).
"""

from absl import flags, logging

from vppo_jax.io.cli import run_conversion, run_program
from vppo_jax.models.qwen2_5_vl.checkpoint import save_params
from vppo_jax.models.qwen2_5_vl.hf_io import open_hf_params

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("hf_dir", None, "HF directory with config.json and *.safetensors, or a Hub name.")
    flags.DEFINE_string("out", None, "Output checkpoint directory (must not exist).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Default: as stored.")
    flags.mark_flags_as_required(["hf_dir", "out"])


def convert(hf_dir: str, out: str, dtype: str | None = None) -> int:
    """The conversion; bad input is one error line and exit status 1 (vppo_jax.io.cli.run_conversion)."""

    def work():
        config, params = open_hf_params(hf_dir, dtype)
        save_params(config, params, out)

    return run_conversion(work, out)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    return convert(FLAGS.hf_dir, FLAGS.out, FLAGS.dtype)


if __name__ == "__main__":
    define_flags()
    run_program(main)
