"""Random access to the rows of parquet and JSON-lines files: a grain RandomAccessDataSource.

Nothing is decoded up front. A parquet file is read one row group at a time (a few recent
groups are cached), so a 39k-row ViRL39K file with its image bytes never sits in memory;
HF datasets writes image parquet in groups of 100 rows. A JSON-lines file is indexed by
the byte offset of each line once, and a row is read by seeking to it. Files may be local,
in a bucket (gs://...; vppo_jax/io/paths.py: reads become ranged downloads) or files of a
Hugging Face Hub dataset, "ORG/NAME/FILE" (vppo_jax/io/hub.py).

A file that cannot be opened at all (missing, empty, not parquet) stops the run at start-up
with an InputError. A row that cannot be read later, whatever the reason (a damaged row
group, a malformed line, a failed ranged read), becomes a `Row` with `error` set, naming the
file and the row, which the pipeline skips and counts: a restart would meet the same row
again, so raising there would only turn one bad row into a crash loop.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from vppo_jax.errors import InputError, one_line
from vppo_jax.io import hub, paths

log = logging.getLogger(__name__)

ROW_GROUP_CACHE = 4  # row groups kept decoded per parquet file (sequential reads hit, shuffled reads rarely do)
LARGE_ROW_GROUP_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class Row:
    index: int  # position in the concatenation of all files
    fields: dict[str, Any]  # the requested columns present in the row, as Python objects
    base_dir: str  # directory of the row's file: image paths are relative to it
    error: str = ""  # why the row could not be parsed, "" when it was


class ParquetRows:
    def __init__(self, path: str, columns: Sequence[str]):
        self.path = path
        self.columns = list(columns)
        with unreadable_file_errors(path, "a parquet file"):
            self._open()
            names, metadata = self._file.schema_arrow.names, self._file.metadata
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise InputError(
                f"{path} has no column {missing}; its columns are {names}. "
                "Set data.problem_key / answer_key / images_key to the names this file uses."
            )
        groups = [metadata.row_group(g) for g in range(metadata.num_row_groups)]
        self.group_starts = np.cumsum([0] + [g.num_rows for g in groups]).tolist()
        largest = max((g.total_byte_size for g in groups), default=0)
        if largest > LARGE_ROW_GROUP_BYTES:
            log.warning(
                "%s: row groups of up to %d MB; every example read decodes its whole group. Rewrite the file "
                "with pyarrow.parquet.write_table(table, path, row_group_size=100) for faster random access.",
                path,
                largest >> 20,
            )

    def _open(self):
        self._file = pq.ParquetFile(paths.open_file(self.path, "rb"))
        self._cache: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._lock = threading.Lock()  # grain reads from several threads; pyarrow file handles are not shared safely

    def __len__(self) -> int:
        return self.group_starts[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The row's columns; raises RowGroupError when its row group cannot be read."""
        group = bisect.bisect_right(self.group_starts, index) - 1
        with self._lock:
            table = self._cache.pop(group, None)
            if table is None:
                try:
                    table = self._file.read_row_group(group, columns=self.columns)
                except Exception as error:  # pyarrow raises OSError, ArrowInvalid, ... for damaged data
                    # Cached as a failure: the group's other rows fail at once instead of re-reading it.
                    table = RowGroupError(f"row group {group}: {one_line(error)}")
            self._cache[group] = table
            while len(self._cache) > ROW_GROUP_CACHE:
                self._cache.popitem(last=False)
        if isinstance(table, RowGroupError):
            raise table
        return table.slice(index - self.group_starts[group], 1).to_pylist()[0]

    def __getstate__(self):  # grain pickles sources into worker processes: reopen there
        return {"path": self.path, "columns": self.columns, "group_starts": self.group_starts}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()


class RowGroupError(Exception):
    """A parquet row group that could not be read; every row in it is skipped."""


class JsonLinesRows:
    def __init__(self, path: str):
        self.path = path
        offsets = []
        with unreadable_file_errors(path, "a JSON Lines file"), paths.open_file(path, "rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    offsets.append(offset)
                offset += len(line)
            if offsets:
                f.seek(offsets[0])
                first = f.read(1)
        if offsets and first == b"[":
            raise InputError(f"{path} is one JSON array; write one JSON object per line (JSON Lines).")
        self.offsets = np.asarray(offsets, np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The row's object; raises ValueError when the line is not a JSON object."""
        with paths.open_file(self.path, "rb") as f:
            f.seek(int(self.offsets[index]))
            row = json.loads(f.readline())
        if not isinstance(row, dict):
            raise ValueError(f"line holds a JSON {type(row).__name__}, not an object")
        return row


@contextlib.contextmanager
def unreadable_file_errors(path: str, kind: str):
    """Failures to open `path` as `kind` -> one InputError naming the file (storage errors,
    already InputError from vppo_jax/io/paths.py, pass unchanged)."""
    try:
        yield
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: no such file.") from None
    except Exception as error:
        raise InputError(
            f"{path} cannot be read as {kind} ({one_line(error)}): rewrite the file, or drop it from the data files."
        ) from error


def open_rows(path: str, columns: Sequence[str]) -> ParquetRows | JsonLinesRows:
    """The rows of a data file: a local path, a URL or a Hub dataset's ORG/NAME/FILE."""
    if not path.endswith((".parquet", ".jsonl", ".json")):
        raise InputError(
            f"{path}: unknown data file type; use .parquet or .jsonl (JSON Lines, also accepted as .json)."
        )
    path = paths.absolute(hub.resolve_data_file(path))
    return ParquetRows(path, columns) if path.endswith(".parquet") else JsonLinesRows(path)


class RowSource:
    """The rows of several files, concatenated in order; `source[i]` is a `Row`."""

    def __init__(self, files: Sequence[str], columns: Sequence[str]):
        if isinstance(files, str) or not files or not all(files):
            raise InputError(f"Data files must be a non-empty list of paths, got {files!r}.")
        self.columns = tuple(columns)
        self.files = [open_rows(p, columns) for p in files]
        self.file_starts = np.cumsum([0] + [len(f) for f in self.files]).tolist()
        if len(self) == 0:
            raise InputError(f"The data files {list(files)} hold no rows: check that they are the files you meant.")

    def __len__(self) -> int:
        return self.file_starts[-1]

    def __getitem__(self, index: int) -> Row:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        k = bisect.bisect_right(self.file_starts, index) - 1
        file = self.files[k]
        base_dir = os.path.dirname(file.path)
        row_in_file = index - self.file_starts[k]
        try:
            row = file[row_in_file]
        except Exception as error:  # any failure to read one row skips that row (module docstring)
            return Row(index, {}, base_dir, error=f"{file.path} row {row_in_file}: {one_line(error)}")
        return Row(index, {c: row[c] for c in self.columns if c in row}, base_dir)

    def __repr__(self) -> str:  # grain records the source's repr in its checkpoints
        return f"RowSource({[f.path for f in self.files]}, columns={self.columns})"
