"""python -m vppo_jax.data.prepare NAME --out=DIR [--src=PATH[,PATH...]]

Converts dataset NAME, downloaded from the Hugging Face hub as published, into
DIR/NAME.parquet (columns problem, answer, images with the image bytes embedded; row groups
of 100 rows) and DIR/NAME.prepare.json (source files, rows written, rows skipped by reason).

    virl39k      the training set (chamber111/VPPO_ViRL39K_train)
    mathverse, mmk12, geo3k, wemath, logicvista, mmmu_pro
                 benchmarks of the PAPO evaluation suite (PAPO-Galaxy/PAPO_eval)
    dynamath, mathvision
                 benchmarks the VPPO authors added to it (chamber111/VPPO-Eval)

--src is the downloaded dataset: its directory (the data files are found in it by their
published names, the images in it loose or in zip archives), or data files. Without --src,
the dataset's hub id; an error then prints the `hf download` command that fetches it.

    python -m vppo_jax.data.prepare virl39k --out=data --src=downloads/VPPO_ViRL39K_train
    python -m vppo_jax.data.prepare mathverse --out=data/benchmarks --src=downloads/PAPO_eval
    python -m vppo_jax.eval --checkpoint=runs/vppo_7b --data data/benchmarks/*.parquet

Sources, splits, row counts and what is converted how: docs/datasets.md.
"""

import functools

from absl import flags

from vppo_jax.data.prepare.convert import prepare, summary
from vppo_jax.data.prepare.registry import DATASETS
from vppo_jax.errors import InputError
from vppo_jax.io.cli import parse_flags, run_program

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("out", None, "Directory for NAME.parquet and NAME.prepare.json.")
    flags.DEFINE_list(
        "src", None, "The downloaded dataset: a directory or data files, comma-separated (default: its hub id)."
    )
    flags.mark_flags_as_required(["out"])


def dataset_name(words: list[str]) -> list[str]:
    """The one word after the flags: a dataset name; raises ValueError listing the names otherwise."""
    if len(words) != 1 or words[0] not in DATASETS:
        raise ValueError(f"name one dataset to prepare, one of {', '.join(DATASETS)} (got {' '.join(words) or 'none'})")
    return words


def main(argv):
    """Bad input (PrepareError, an existing output) ends the program with one line and exit status 2 (io/cli.py)."""
    dataset = DATASETS[argv[1]]
    try:
        report = prepare(dataset, FLAGS.src or [dataset.hub_id], FLAGS.out)
    except FileExistsError as error:
        raise InputError(str(error)) from None
    print(summary(report))
    return 0


if __name__ == "__main__":
    define_flags()
    run_program(main, flags_parser=functools.partial(parse_flags, arguments=dataset_name))
