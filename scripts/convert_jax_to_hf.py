"""Converts an orbax checkpoint of this project back into a Hugging Face Qwen2.5-VL directory.

    python scripts/convert_jax_to_hf.py --checkpoint=/path/qwen7b_jax --out=/path/hf_export [--dtype=bfloat16]

The output loads with transformers' Qwen2_5_VLForConditionalGeneration.from_pretrained:
config.json, legacy-named safetensors (sharded with an index above --max_shard_gb) and the
tokenizer and processor files of the original directory, in --dtype (default: the dtype the
checkpoint holds). It appears only when complete.
"""
import argparse
import sys

from vppo_jax.io.cli import run_conversion
from vppo_jax.models.qwen2_5_vl.checkpoint import open_params
from vppo_jax.models.qwen2_5_vl.config import DTYPES
from vppo_jax.models.qwen2_5_vl.hf_io import write_hf_directory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="directory written by convert_hf_to_jax.py")
    parser.add_argument("--out", required=True, help="output HF directory (must not exist)")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="largest safetensors shard, in GiB")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the exported tensors (default: as stored)")
    args = parser.parse_args(argv)

    def convert():
        config, shapes, load = open_params(args.checkpoint, args.dtype)
        write_hf_directory(config, shapes, load, args.out, int(args.max_shard_gb * 1024**3))

    return run_conversion(convert, args.out)


if __name__ == "__main__":
    sys.exit(main())
