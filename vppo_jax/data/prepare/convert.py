"""The conversion run: source rows -> OUT/<name>.parquet and OUT/<name>.prepare.json.

    report = prepare(DATASETS["geo3k"], ["downloads/PAPO_eval"], "data/benchmarks")

Rows that cannot be converted are skipped and counted by reason (example.SKIP_REASONS); the
first skip of each reason is printed with its row and detail. The report (also returned)
holds the source files, the counts and what the dataset family changed in the rows.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence

import tqdm

from vppo_jax.data.prepare.example import SKIP_REASONS, PrepareError, Skip, build_example
from vppo_jax.data.prepare.image_files import ImageFiles
from vppo_jax.data.prepare.registry import Dataset
from vppo_jax.data.prepare.sources import SourceRows, source_files
from vppo_jax.data.prepare.writer import ParquetOutput, write_json


def output_paths(dataset: Dataset, out: str) -> tuple[str, str]:
    """(the parquet file, its report): named after the dataset, which names the benchmark in evaluation."""
    return os.path.join(out, f"{dataset.name}.parquet"), os.path.join(out, f"{dataset.name}.prepare.json")


def prepare(dataset: Dataset, src: Sequence[str], out: str) -> dict:
    """Converts `dataset` from `src` into `out`; returns the report. Raises PrepareError (no
    usable input: wrong files, missing columns, no row converted) and FileExistsError."""
    parquet_path, report_path = output_paths(dataset, out)
    output = ParquetOutput(parquet_path)  # refuses an existing file before any input is read
    files = source_files(src, dataset)
    rows = SourceRows(files.data_files, dataset)
    skipped: collections.Counter[str] = collections.Counter()
    notes: collections.Counter[str] = collections.Counter()
    written = 0
    with ImageFiles(files.image_directories) as images, output:
        for where, row in tqdm.tqdm(rows, total=len(rows), desc=dataset.name, unit=" rows"):
            try:
                if isinstance(row, Skip):
                    raise row
                if not isinstance(row, dict):
                    raise Skip("bad_row", f"a row must be an object, got {type(row).__name__}")
                fields = dataset.fields(row)
                example = build_example(fields, images)
            except Skip as skip:
                count_skip(skipped, skip.reason, f"{where}: {skip}")
                continue
            except Exception as error:  # a row of unforeseen shape must not stop a 39k-row run; its detail is printed
                count_skip(skipped, "bad_row", f"{where}: {type(error).__name__}: {error}")
                continue
            output.write(example)
            notes.update(fields.notes)
            written += 1
        if not written:  # raised inside the `with`: no output file is left
            raise PrepareError(
                f"none of the {len(rows)} rows of {list(files.data_files)} could be converted "
                f"(skipped: {dict(skipped)}); see the first skip of each reason above."
            )
    report = {
        "dataset": dataset.name,
        "hub_id": dataset.hub_id,
        "source_files": list(files.data_files),
        "output": os.path.abspath(parquet_path),
        "rows_read": len(rows),
        "published_rows": dataset.published_rows,
        "written": written,
        "skipped": {reason: skipped[reason] for reason in SKIP_REASONS},
        "notes": dict(notes),
    }
    write_json(report_path, report)
    return report


def count_skip(skipped: collections.Counter[str], reason: str, detail: str):
    if not skipped[reason]:
        tqdm.tqdm.write(f"skipping a row ({reason}): {detail}. Later '{reason}' skips are only counted.")
    skipped[reason] += 1


def summary(report: dict) -> str:
    """The report in a few lines for the terminal."""
    skipped = {reason: n for reason, n in report["skipped"].items() if n}
    lines = [
        f"{report['dataset']}: wrote {report['written']} of {report['rows_read']} rows to {report['output']}",
        f"skipped {sum(skipped.values())}" + (f": {skipped}" if skipped else ""),
    ]
    if report["notes"]:
        lines.append(f"notes: {report['notes']}")
    if report["rows_read"] != report["published_rows"]:
        lines.append(
            f"warning: the published {report['hub_id']} split has {report['published_rows']} rows, the source "
            f"{report['rows_read']}: check that --src is that dataset, whole."
        )
    return "\n".join(lines)
