"""Converts an orbax checkpoint of this project back into a Hugging Face Qwen2.5-VL directory.

    python scripts/convert_jax_to_hf.py --checkpoint=/path/qwen7b_jax --out=/path/hf_export [--dtype=bfloat16]

The output loads with transformers' Qwen2_5_VLForConditionalGeneration.from_pretrained:
config.json, legacy-named safetensors (sharded with an index above --max_shard_gb) and the
tokenizer and processor files of the original directory, in --dtype (default: the dtype the
checkpoint holds). It appears only when complete. Either path may be in a bucket (gs://...).
"""

from absl import app, flags, logging

from vppo_jax.io.cli import parse_flags, run_conversion
from vppo_jax.models.qwen2_5_vl.checkpoint import open_params
from vppo_jax.models.qwen2_5_vl.config import DTYPES
from vppo_jax.models.qwen2_5_vl.hf_io import write_hf_directory

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("checkpoint", None, "Directory written by convert_hf_to_jax.py.")
    flags.DEFINE_string("out", None, "Output HF directory (must not exist).")
    flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors shard, in GiB.")
    flags.DEFINE_enum("dtype", None, sorted(DTYPES), "Dtype of the exported tensors (default: as stored).")
    flags.mark_flags_as_required(["checkpoint", "out"])


def convert(checkpoint: str, out: str, max_shard_gb: float = 5.0, dtype: str | None = None) -> int:
    """The conversion; bad input is one error line and exit status 1 (vppo_jax.io.cli.run_conversion)."""

    def work():
        config, shapes, load = open_params(checkpoint, dtype)
        write_hf_directory(config, shapes, load, out, int(max_shard_gb * 1024**3))

    return run_conversion(work, out)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # as before absl: INFO logs of orbax, JAX, ... stay hidden
    return convert(FLAGS.checkpoint, FLAGS.out, FLAGS.max_shard_gb, FLAGS.dtype)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
