"""--src -> the dataset's data files, and the rows in them (parquet, a JSON array, or JSON lines).

Every file's columns are checked before the first row is converted, so a file of another
dataset fails at once rather than as thousands of skipped rows.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vppo_jax.data.prepare.example import PrepareError, Skip
from vppo_jax.data.prepare.registry import Dataset
from vppo_jax.io import hub

BATCH_ROWS = 100  # parquet rows decoded at a time: ViRL39K's image bytes are ~75 KB a row


@dataclasses.dataclass(frozen=True)
class SourceFiles:
    data_files: tuple[str, ...]
    image_directories: tuple[str, ...]  # where the image files that rows name are looked up


def source_files(src: Sequence[str], dataset: Dataset) -> SourceFiles:
    """The local files of `dataset` that `src` names: the data files among them, or else the
    files under its directories that match the dataset's published data files by name.
    Images are looked up under the directories, and beside data files given by path."""
    # An entry that is not a local path is a Hub dataset id (the default, dataset.hub_id): its
    # published data and image files, from the Hugging Face cache or downloaded into it.
    try:
        src = [
            path if os.path.exists(path) else hub.resolve_dataset(path, list(dataset.data_files + dataset.image_files))
            for path in src
        ]
    except hub.HubLookupError as error:
        raise PrepareError(f"{error}\n{download_hint(dataset)}") from error
    files = [os.path.abspath(path) for path in src if os.path.isfile(path)]
    directories = [os.path.abspath(path) for path in src if os.path.isdir(path)]
    if files:
        return SourceFiles(tuple(files), tuple(dict.fromkeys(directories + [os.path.dirname(f) for f in files])))
    names = [os.path.basename(pattern) for pattern in dataset.data_files]
    patterns = [os.path.join(directory, "**", name) for directory in directories for name in names]
    found = sorted({path for pattern in patterns for path in glob.glob(pattern, recursive=True)})
    if not found:
        raise PrepareError(f"no file named {' or '.join(names)} under {', '.join(src)}. {download_hint(dataset)}")
    return SourceFiles(tuple(found), tuple(directories))


def download_hint(dataset: Dataset) -> str:
    includes = " ".join(f'--include "{pattern}"' for pattern in dataset.data_files + dataset.image_files)
    return (
        f"{dataset.name} is published as {dataset.hub_id}; download it with\n"
        f"    hf download {dataset.hub_id} --repo-type dataset {includes} --local-dir DIR\n"
        "and pass --src=DIR (or its data file)."
    )


class SourceRows:
    """The rows of all data files in order, as (where, row): `where` names the file and row for
    messages; `row` is the row's object, or a Skip for a JSON line that does not parse."""

    def __init__(self, files: Sequence[str], dataset: Dataset):
        self.files = [open_rows(path, dataset) for path in files]

    def __len__(self) -> int:
        return sum(len(f) for f in self.files)

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for rows in self.files:
            for index, row in enumerate(rows):
                yield f"{rows.path} row {index}", row


def open_rows(path: str, dataset: Dataset) -> ParquetRows | JsonRows:
    if path.endswith(".parquet"):
        return ParquetRows(path, dataset)
    if path.endswith((".json", ".jsonl")):
        return JsonRows(path, dataset)
    raise PrepareError(f"{path}: not a .parquet, .json or .jsonl file (the data files of {dataset.hub_id} are)")


class ParquetRows:
    def __init__(self, path: str, dataset: Dataset):
        self.path, self.columns = path, list(dataset.columns)
        try:
            self.file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as error:
            raise PrepareError(f"{path} is not a readable parquet file ({error}); download it again.") from None
        check_columns(path, self.file.schema_arrow.names, dataset)

    def __len__(self) -> int:
        return self.file.metadata.num_rows

    def __iter__(self) -> Iterator[Any]:
        try:
            for batch in self.file.iter_batches(batch_size=BATCH_ROWS, columns=self.columns):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as error:  # rows cannot be told apart in a corrupt row group
            raise PrepareError(f"{self.path} stops being readable ({error}); download it again.") from None


class JsonRows:
    """A JSON array of rows (LLaMA-Factory's data files) or JSON lines (.jsonl, or a .json that
    is not one document); the evaluation sets are small enough to hold in memory, which lets
    the columns be checked across all rows."""

    def __init__(self, path: str, dataset: Dataset):
        self.path = path
        with open(path, encoding="utf-8") as f:
            content = f.read()
        try:
            self.rows = json.loads(content) if path.endswith(".json") else json_lines(content)
        except json.JSONDecodeError:
            self.rows = json_lines(content)
        if not isinstance(self.rows, list):
            raise PrepareError(f"{path} holds one JSON {type(self.rows).__name__}, not a list of rows")
        columns = {key for row in self.rows if isinstance(row, dict) for key in row}
        check_columns(path, sorted(columns), dataset)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)


def json_lines(content: str) -> list[Any]:
    return [json_line(line) for line in content.splitlines() if line.strip()]


def json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        return Skip("bad_row", f"not JSON: {error}")


def check_columns(path: str, names: Sequence[str], dataset: Dataset):
    missing = [column for column in dataset.columns if column not in names]
    if missing:
        raise PrepareError(
            f"{path} has no column {missing}; its columns are {list(names)}. {dataset.name} reads the files of "
            f"{dataset.hub_id} ({', '.join(dataset.data_files)}), whose rows have {list(dataset.columns)}: point "
            "--src at that dataset as published, or name the dataset this file belongs to."
        )
