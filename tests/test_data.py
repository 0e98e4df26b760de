"""The grain pipeline: file formats, bad rows as counted skips, per-epoch shuffles, checkpoint resume, shards."""

import io
import json
import logging
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vppo_jax import data
from vppo_jax.data import rows as rows_module

from hf_reference import random_image
from test_processing import tiny_builder

NUM_ROWS = 12


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def examples(n=NUM_ROWS):
    """(problem, answer, image) rows; images of a few sizes, each small enough to keep the test fast."""
    return [
        (f"<image>Problem {i}: find x.", str(i), random_image(20 + 7 * (i % 4), 30 + 5 * (i % 3), seed=i))
        for i in range(n)
    ]


def write_parquet(path, rows, image_column):
    table = pa.table(
        {
            "problem": [p for p, _, _ in rows],
            "answer": [a for _, a, _ in rows],
            "images": [[image_column(image, i)] for i, (_, _, image) in enumerate(rows)],
        }
    )
    pq.write_table(table, path, row_group_size=5)  # several row groups, one partial
    return str(path)


def write_jsonl(path, rows):
    """Images as files next to the data file, named relative to it."""
    (path.parent / "images").mkdir(exist_ok=True)
    with open(path, "w") as f:
        for i, (problem, answer, image) in enumerate(rows):
            image.save(path.parent / "images" / f"{i}.png")
            f.write(json.dumps({"problem": problem, "answer": answer, "images": [f"images/{i}.png"]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def builder():
    return tiny_builder()


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("parquet") / "train.parquet"
    return write_parquet(path, examples(), lambda image, i: {"bytes": png_bytes(image), "path": f"{i}.png"})


def read_all(files, builder, **kwargs):
    dataset = data.prompt_dataset(files, builder, seed=0, num_epochs=1, shuffle=False, **kwargs)
    return list(dataset)


def test_rows_become_the_prompts_of_their_examples(parquet_file, builder):
    prompts = read_all([parquet_file], builder)
    assert [p.index for p in prompts] == list(range(NUM_ROWS))
    for prompt, (problem, answer, image) in zip(prompts, examples()):
        expected = builder(prompt.index, problem, answer, [image])
        assert prompt.answer == answer and not prompt.skipped
        np.testing.assert_array_equal(prompt.prompt_ids, expected.prompt_ids)
        np.testing.assert_array_equal(prompt.pixel_values, expected.pixel_values)
        np.testing.assert_array_equal(prompt.image_grid_thw, expected.image_grid_thw)


def test_every_image_form_gives_the_same_prompts(tmp_path, parquet_file, builder):
    raw_bytes = write_parquet(tmp_path / "bytes.parquet", examples(), lambda image, i: png_bytes(image))
    jsonl = write_jsonl(tmp_path / "train.jsonl", examples())
    reference = read_all([parquet_file], builder)
    for files in ([raw_bytes], [jsonl]):
        for ours, expected in zip(read_all(files, builder), reference, strict=True):
            np.testing.assert_array_equal(ours.prompt_ids, expected.prompt_ids)
            np.testing.assert_array_equal(ours.pixel_values, expected.pixel_values)


def test_files_are_concatenated_and_columns_renamed(tmp_path, builder):
    renamed = pa.table({"question": ["Q?"], "solution": ["4"], "pictures": [[png_bytes(random_image(30, 30))]]})
    pq.write_table(renamed, tmp_path / "renamed.parquet")
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"question": "Why?", "solution": 5, "pictures": []}) + "\n")
    prompts = read_all(
        [str(tmp_path / "renamed.parquet"), str(jsonl)],
        builder,
        problem_key="question",
        answer_key="solution",
        images_key="pictures",
    )
    assert [(p.index, p.answer, p.skipped) for p in prompts] == [(0, "4", False), (1, "5", False)]


def test_bad_rows_are_skipped_with_their_reason(tmp_path, builder, caplog):
    good = png_bytes(random_image(30, 30))
    rows = [
        {"problem": "fine", "answer": "1", "images": [{"bytes": good, "path": None}]},
        {"problem": "corrupt", "answer": "1", "images": [{"bytes": good[:40], "path": None}]},
        {"problem": "not an image", "answer": "1", "images": [{"bytes": b"hello", "path": None}]},
        {"problem": "missing file", "answer": "1", "images": [{"bytes": None, "path": "nowhere.png"}]},
        {"problem": None, "answer": "1", "images": []},
        {"problem": "no answer", "answer": None, "images": []},
        {"problem": "  ", "answer": "1", "images": []},
        {"problem": "long " * 300, "answer": "1", "images": []},
        {"problem": "<image><image>", "answer": "1", "images": [{"bytes": good, "path": None}]},
    ]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"problem": "cut off", "answ\n' + json.dumps({"answer": "1", "images": []}) + "\n[1, 2]\n")

    prompts = read_all([str(path), str(jsonl)], tiny_builder(max_prompt_length=1000))
    reasons = [p.skip_reason for p in prompts]
    assert reasons == [
        None,
        "bad_image",
        "bad_image",
        "bad_image",
        "missing_field",
        "missing_field",
        "empty_problem",
        "too_long",
        "image_mismatch",
        "bad_row",
        "missing_field",
        "bad_row",
    ]
    assert all(p.prompt_ids is None and p.pixel_values is None for p in prompts[1:])

    skips = data.SkipCounter()
    with caplog.at_level(logging.WARNING, logger="vppo_jax.data.skips"):
        kept = [p for p in prompts + prompts if not skips.count(p)]
    assert [p.index for p in kept] == [0, 0]
    metrics = skips.metrics()
    assert metrics["data/skipped_bad_image"] == 6 and metrics["data/skipped_missing_field"] == 6
    assert metrics["data/skipped_bad_row"] == 4 and metrics["data/skipped_too_long"] == 2
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 6  # one per reason seen, although every reason occurred twice or more
    assert "row 1: image 0" in warned[0] and "data/skipped_bad_image" in warned[0]


def test_file_errors_name_the_problem(tmp_path, parquet_file, builder):
    with pytest.raises(ValueError, match=r"has no column \['question'\].*problem_key"):
        data.prompt_dataset([parquet_file], builder, seed=0, problem_key="question")
    array = tmp_path / "array.json"
    array.write_text('[{"problem": "p"}]')
    with pytest.raises(ValueError, match="one JSON array"):
        data.prompt_dataset([str(array)], builder, seed=0)
    with pytest.raises(ValueError, match="use .parquet or .jsonl"):
        data.prompt_dataset([str(tmp_path / "data.csv")], builder, seed=0)
    with pytest.raises(ValueError, match="non-empty list"):
        data.prompt_dataset([""], builder, seed=0)


def test_parquet_is_read_one_row_group_at_a_time(parquet_file):
    source = data.RowSource([parquet_file], ("problem", "answer", "images"))
    [source[i] for i in range(len(source))]
    parquet_rows = source.files[0]
    assert len(parquet_rows.group_starts) - 1 == 3 and len(parquet_rows._cache) <= rows_module.ROW_GROUP_CACHE
    # grain pickles sources into worker processes; the copy reopens the file.
    assert pickle.loads(pickle.dumps(source))[11].fields == source[11].fields


def indices(dataset, start, stop):
    return [dataset[i].index for i in range(start, stop)]


def test_shuffle_is_seeded_and_differs_per_epoch(parquet_file, builder):
    dataset = data.prompt_dataset([parquet_file], builder, seed=3, num_epochs=3)
    assert len(dataset) == 3 * NUM_ROWS
    epochs = [indices(dataset, e * NUM_ROWS, (e + 1) * NUM_ROWS) for e in range(3)]
    assert all(sorted(e) == list(range(NUM_ROWS)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != list(range(NUM_ROWS))
    again = data.prompt_dataset([parquet_file], builder, seed=3, num_epochs=3)
    assert indices(again, 0, 3 * NUM_ROWS) == sum(epochs, [])
    other_seed = data.prompt_dataset([parquet_file], builder, seed=4)
    assert indices(other_seed, 0, NUM_ROWS) != epochs[0]


def test_iterator_resumes_exactly_where_it_stopped(parquet_file, builder):
    def make_iterator():  # what a restarted trainer does: a fresh pipeline
        dataset = data.prompt_dataset([parquet_file], builder, seed=1, num_epochs=None)
        return data.prompt_iterator(dataset, num_threads=2, prefetch_buffer_size=4)

    iterator = make_iterator()
    [next(iterator) for _ in range(9)]
    state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint stores it
    after = [next(iterator) for _ in range(8)]  # crosses into the second epoch

    resumed = make_iterator()
    resumed.set_state(state)
    for ours, expected in zip([next(resumed) for _ in range(8)], after):
        assert ours.index == expected.index
        np.testing.assert_array_equal(ours.prompt_ids, expected.prompt_ids)
        np.testing.assert_array_equal(ours.pixel_values, expected.pixel_values)


def test_shards_are_disjoint_and_cover_the_data(parquet_file, builder):
    shards = [
        indices(
            data.prompt_dataset([parquet_file], builder, seed=0, num_epochs=1, process_index=k, process_count=2),
            0,
            NUM_ROWS // 2,
        )
        for k in range(2)
    ]
    assert set(shards[0]).isdisjoint(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(NUM_ROWS))
    with pytest.raises(ValueError, match="process_index must be in"):
        data.prompt_dataset([parquet_file], builder, seed=0, process_index=2, process_count=2)
