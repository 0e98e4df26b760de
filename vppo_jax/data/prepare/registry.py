"""NAME -> the dataset it names: where it is published, how its rows are laid out.

The names are the output files' names, the ones the README's "Reproducing the paper" step and
`python -m vppo_jax.eval --data data/benchmarks/*.parquet` use. Sources, splits and row
counts: docs/datasets.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from vppo_jax.data.prepare import easyr1, sharegpt
from vppo_jax.data.prepare.example import Fields


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    hub_id: str  # the Hugging Face dataset repository, the default --src
    data_files: tuple[str, ...]  # globs of its data files in that repository
    image_files: tuple[str, ...]  # globs of its image archives or folders there; () when the data files embed them
    columns: tuple[str, ...]  # what every data file must have
    fields: Callable[[dict], Fields]  # a data file's row -> where it keeps problem, answer and images
    published_rows: int  # rows of the published split (docs/datasets.md): a different count flags a wrong --src


PAPO_EVAL = "PAPO-Galaxy/PAPO_eval"
VPPO_EVAL = "chamber111/VPPO-Eval"


def papo_eval(name: str, split: str, archive: str, rows: int) -> Dataset:
    """A split of the PAPO evaluation suite: data/<split>-*.parquet, images in <archive> at the repository root."""
    return Dataset(name, PAPO_EVAL, (f"data/{split}-*.parquet",), (archive,), sharegpt.COLUMNS, sharegpt.fields, rows)


def vppo_eval(name: str, stem: str, rows: int) -> Dataset:
    """A benchmark the VPPO authors added to the suite: data/vppo/<stem>.json, images in data/images/<stem>/."""
    files = (f"data/vppo/{stem}.json",)
    return Dataset(name, VPPO_EVAL, files, (f"data/images/{stem}/*",), sharegpt.COLUMNS, sharegpt.fields, rows)


DATASETS = {
    dataset.name: dataset
    for dataset in (
        Dataset(
            "virl39k",
            "chamber111/VPPO_ViRL39K_train",
            ("data/train-*.parquet",),
            (),
            easyr1.COLUMNS,
            easyr1.fields,
            38870,
        ),
        papo_eval("mathverse", "AI4Math_MathVerse", "AI4Math_MathVerse_images.zip", 2180),
        vppo_eval("dynamath", "DynaMath_DynaMath_Sample", 3666),
        papo_eval("mmk12", "PAPO_MMK12", "PAPO_MMK12_test_images.zip", 2000),
        papo_eval("geo3k", "hiyouga_geometry3k", "hiyouga_geometry3k_images.zip", 601),
        vppo_eval("mathvision", "MathLLMs_MathVision", 2907),
        papo_eval("wemath", "We_Math", "We-Math_We-Math_images.zip", 1740),
        papo_eval("logicvista", "lscpku_LogicVista", "lscpku_LogicVista_images.zip", 447),
        papo_eval("mmmu_pro", "MMMU_MMMU_Pro", "MMMU_MMMU_Pro_images.zip", 1730),
    )
}
