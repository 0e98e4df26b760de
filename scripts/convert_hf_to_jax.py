"""Converts a Hugging Face Qwen2.5-VL directory into an orbax checkpoint training can start from.

    python scripts/convert_hf_to_jax.py --hf_dir=/path/Qwen2.5-VL-7B-Instruct --out=/path/qwen7b_jax [--dtype=bfloat16]

Tensors stream one at a time from the safetensors files, so a 7B checkpoint (15 GB in
bf16) converts on a 24 GiB machine. The output appears only when complete.
"""
import argparse
import sys

from vppo_jax.models.qwen2_5_vl.checkpoint import save_params
from vppo_jax.models.qwen2_5_vl.hf_io import open_hf_params
from vppo_jax.io.cli import run_conversion


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_dir", required=True, help="HF directory with config.json and *.safetensors")
    parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: as stored")
    args = parser.parse_args(argv)

    def convert():
        config, params = open_hf_params(args.hf_dir, args.dtype)
        save_params(config, params, args.out)

    return run_conversion(convert, args.out)


if __name__ == "__main__":
    sys.exit(main())
