"""Writing the converted rows and the report, each complete or not at all.

The parquet file is written under a temporary name beside its destination and renamed into
place once complete: a crash leaves no file that looks finished (only a `.NAME.*.partial`).
Row groups of ROW_GROUP_ROWS rows, as vppo_jax/data/rows.py recommends for random access.
"""

from __future__ import annotations

import json
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 100
SCHEMA = pa.schema(
    [
        ("problem", pa.string()),
        ("answer", pa.string()),
        # HF datasets' image struct, which vppo_jax/data/images.py open_image reads.
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ]
)


class ParquetOutput:
    """with ParquetOutput(path) as output: output.write(row) ... -> `path` exists only after a clean exit."""

    def __init__(self, path: str):
        if os.path.exists(path):
            raise FileExistsError(f"{path} already exists; remove it or choose another --out.")
        self.path = path
        self.rows: list[dict] = []

    def __enter__(self) -> ParquetOutput:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        name = os.path.basename(self.path)
        handle, self.partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
        os.close(handle)
        self.writer = pq.ParquetWriter(self.partial, SCHEMA)
        return self

    def write(self, row: dict):
        self.rows.append(row)
        if len(self.rows) == ROW_GROUP_ROWS:
            self._flush()

    def _flush(self):
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=SCHEMA), row_group_size=ROW_GROUP_ROWS)
            self.rows = []

    def __exit__(self, exc_type, exc, traceback):
        try:
            if exc_type is None:
                self._flush()
            self.writer.close()
            if exc_type is None:
                os.replace(self.partial, self.path)
        finally:
            if os.path.exists(self.partial):
                os.remove(self.partial)


def write_json(path: str, content: dict):
    """`content` as indented JSON at `path`, written under a temporary name and renamed into place."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
    os.replace(partial, path)
