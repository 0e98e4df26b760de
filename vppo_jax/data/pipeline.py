"""The grain pipeline: rows of the data files -> `Prompt` records, sharded, shuffled, repeated.

    dataset = data.prompt_dataset(files, builder, seed=1, num_epochs=None,
                                  process_index=jax.process_index(), process_count=jax.process_count())
    iterator = data.prompt_iterator(dataset)
    prompt = next(iterator)            # a Prompt; count skipped ones with data.SkipCounter
    state = iterator.get_state()       # checkpoint it; iterator.set_state(state) resumes at the next prompt

Order: the rows are shuffled with `seed`, a different permutation every epoch (grain folds
the epoch into the seed), and repeated; process i takes elements i, i + n, i + 2n, ... of
that stream (n = process_count), so n processes together read exactly what one process
reads, each only its share, and decode rows into prompts lazily as they are read.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain

from vppo_jax.data.images import open_image
from vppo_jax.data.prompts import Prompt, PromptBuilder, skipped_prompt
from vppo_jax.data.rows import Row, RowSource


class RowToPrompt:
    """A row -> `Prompt`; anything wrong with the row gives a skipped prompt, never an exception."""

    def __init__(self, builder: PromptBuilder, problem_key: str, answer_key: str, images_key: str):
        self.builder = builder
        self.keys = (problem_key, answer_key, images_key)

    def __call__(self, row: Row) -> Prompt:
        if row.error:
            return skipped_prompt(row.index, "bad_row", row.error)
        problem, answer, entries = (row.fields.get(key) for key in self.keys)
        missing = [key for key in self.keys if row.fields.get(key) is None]
        if missing:
            return skipped_prompt(row.index, "missing_field", f"no value for {missing}")
        if not isinstance(problem, str) or not isinstance(entries, list):
            return skipped_prompt(
                row.index,
                "bad_row",
                f"the problem must be a string and the images a list, got {type(problem).__name__} and "
                f"{type(entries).__name__}",
            )
        answer = str(answer)
        images = []
        for k, entry in enumerate(entries):
            try:
                images.append(open_image(entry, row.base_dir))
            except Exception as error:  # PIL raises many types for bad files; one bad image must not stop a run
                return skipped_prompt(row.index, "bad_image", f"image {k}: {type(error).__name__}: {error}", answer)
        return self.builder(row.index, problem, answer, images)


def prompt_dataset(
    files: Sequence[str],
    builder: PromptBuilder,
    *,
    seed: int,
    num_epochs: int | None = None,
    shuffle: bool = True,
    problem_key: str = "problem",
    answer_key: str = "answer",
    images_key: str = "images",
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """A MapDataset of `Prompt` over this process's shard of `files` (parquet or JSON lines).

    num_epochs=None repeats forever. For evaluation: shuffle=False, num_epochs=1. Shards
    differ in length by at most one row.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
    source = RowSource(files, (problem_key, answer_key, images_key))
    if len(source) < process_count:
        raise ValueError(f"{len(source)} rows cannot be shared among {process_count} processes: every shard needs one.")
    rows = grain.MapDataset.source(source)
    if shuffle:
        rows = rows.shuffle(seed=seed)
    rows = rows.repeat(num_epochs)[process_index::process_count]
    return rows.map(RowToPrompt(builder, problem_key, answer_key, images_key))


def prompt_iterator(
    dataset: grain.MapDataset, *, num_threads: int = 4, prefetch_buffer_size: int = 16
) -> grain.DatasetIterator:
    """An iterator over `dataset` reading ahead in threads; checkpointable with get_state/set_state."""
    # grain's defaults (16 threads, 500 elements ahead) suit KiB-sized records; one prompt's
    # pixel_values reach 24 MB at the recipe's 1280*28*28 pixels.
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    return iter(dataset.to_iter_dataset(options))
