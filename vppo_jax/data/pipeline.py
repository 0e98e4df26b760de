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
from PIL import Image

from vppo_jax.data.images import open_image_header
from vppo_jax.data.prompts import Prompt, PromptBuilder, skipped_prompt
from vppo_jax.data.rows import Row, RowSource
from vppo_jax.data.skips import UnusableSourceGuard


class RowToPrompt:
    """A row -> `Prompt`; anything wrong with the row gives a skipped prompt, never an exception,
    until every row of the source has been skipped without a usable one (`UnusableSourceGuard`)."""

    def __init__(self, builder: PromptBuilder, problem_key: str, answer_key: str, images_key: str, guard=None):
        self.builder = builder
        self.keys = (problem_key, answer_key, images_key)
        self.guard = guard

    def __call__(self, row: Row) -> Prompt:
        prompt = self._prompt(row)
        if self.guard is not None:
            self.guard.observe(prompt)
        return prompt

    def _prompt(self, row: Row) -> Prompt:
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
        if not answer.strip():  # every response would be graded against nothing: "\boxed{}" scores 1
            return skipped_prompt(row.index, "missing_field", f"the answer ({self.keys[1]!r}) is empty")
        images = self._open_images(row, entries, answer)
        if isinstance(images, Prompt):
            return images
        return self.builder(row.index, problem, answer, images)

    def _open_images(self, row: Row, entries: list, answer: str) -> list[Image.Image] | Prompt:
        """The row's images decoded, or the skipped prompt saying why not. Their sizes are judged
        from the headers first, so an image whose tokens alone exceed max_prompt_length is never
        decoded."""
        images = []
        for k, entry in enumerate(entries):
            try:
                images.append(open_image_header(entry, row.base_dir))
            except Exception as error:  # PIL raises many types for bad files; one bad image must not stop a run
                return skipped_prompt(row.index, "bad_image", f"image {k}: {type(error).__name__}: {error}", answer)
        try:
            tokens = self.builder.image_tokens([image.size for image in images])
        except ValueError as error:  # aspect ratio above 200
            sizes = [f"{image.width}x{image.height}" for image in images]
            return skipped_prompt(row.index, "bad_image", f"images of {sizes}: {error}", answer)
        if tokens > self.builder.max_prompt_length:
            sizes = ", ".join(f"{image.width}x{image.height}" for image in images)
            detail = f"images of {sizes} alone give {tokens} prompt tokens > max_prompt_length"
            return skipped_prompt(row.index, "too_long", f"{detail} {self.builder.max_prompt_length}", answer)
        for k, image in enumerate(images):
            try:
                image.load()  # decode now: a truncated file fails here, not later in a worker thread
            except Exception as error:
                return skipped_prompt(row.index, "bad_image", f"image {k}: {type(error).__name__}: {error}", answer)
        return images


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
    differ in length by at most one row. Reading raises InputError once every row of the files
    has been skipped since the last usable one (`UnusableSourceGuard`): a stream with nothing
    usable would otherwise be read forever.
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
    guard = UnusableSourceGuard(len(source), [f.path for f in source.files])
    return rows.map(RowToPrompt(builder, problem_key, answer_key, images_key, guard))


def prompt_iterator(
    dataset: grain.MapDataset, *, num_threads: int = 4, prefetch_buffer_size: int = 16
) -> grain.DatasetIterator:
    """An iterator over `dataset` reading ahead in threads; checkpointable with get_state/set_state."""
    # grain's defaults (16 threads, 500 elements ahead) suit KiB-sized records; one prompt's
    # pixel_values reach 24 MB at the recipe's 1280*28*28 pixels.
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    return iter(dataset.to_iter_dataset(options))
