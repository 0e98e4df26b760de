"""Bad input never hangs, never crash-loops and never trains on garbage: each case of damaged or
wrong input either is skipped and counted, naming where it is, or stops with one line (InputError)
naming the problem and the fix."""

import io
import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from vppo_jax import data
from vppo_jax.errors import InputError
from vppo_jax.rollout import rewards
from vppo_jax.rollout.rewards.accuracy import accuracy

from hf_reference import random_image
from test_processing import tiny_builder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, GROUP = 12, 4


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def row(i, answer=None, image=None):
    image = image if image is not None else png_bytes(random_image(20, 20, seed=i))
    return {"problem": f"<image>Problem {i}", "answer": str(i) if answer is None else answer, "images": [image]}


def write(path, rows, **kwargs) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=GROUP, **kwargs)
    return str(path)


@pytest.fixture(scope="module")
def builder():
    return tiny_builder()


def read_all(files, builder):
    return list(data.prompt_dataset(files, builder, seed=0, num_epochs=1, shuffle=False))


def stream(files, builder, **kwargs):
    """The training stream, as the trainer reads it: repeated forever, shuffled, read ahead in threads."""
    return data.prompt_iterator(data.prompt_dataset(files, builder, seed=0, **kwargs), num_threads=2)


# --- rows that cannot be read -----------------------------------------------------------------


def test_a_damaged_row_group_skips_its_rows_naming_file_and_row(tmp_path, builder):
    path = write(tmp_path / "damaged.parquet", [row(i) for i in range(ROWS)], compression="snappy")
    images = pq.ParquetFile(path).metadata.row_group(1).column(2)  # the second group's image bytes
    start = images.dictionary_page_offset or images.data_page_offset
    raw = bytearray(open(path, "rb").read())
    raw[start + 30 : start + images.total_compressed_size - 30] = b"\xff" * (images.total_compressed_size - 60)
    open(path, "wb").write(raw)
    with pytest.raises(OSError, match="Corrupt snappy compressed data"):  # the damage pyarrow meets
        pq.ParquetFile(path).read_row_group(1)

    prompts = read_all([path], builder)
    assert [p.skip_reason for p in prompts] == [None] * GROUP + ["bad_row"] * GROUP + [None] * GROUP
    assert prompts[5].skip_detail.startswith(
        f"row 5: {path} row 5: RowGroupError: row group 1: OSError: Corrupt snappy"
    )
    assert "\n" not in prompts[5].skip_detail

    # Training goes on past the damage, epoch after epoch, counting it: no crash, so no crash loop.
    skips, used = data.SkipCounter(), []
    for prompt in itertools.islice(stream([path], builder), 3 * ROWS):
        if not skips.count(prompt):
            used.append(prompt.index)
    assert sorted(used) == sorted(3 * [*range(GROUP), *range(2 * GROUP, 3 * GROUP)])
    assert skips.metrics()["data/skipped_bad_row"] == 3 * GROUP


def test_a_read_error_of_any_type_skips_the_row(tmp_path, builder, monkeypatch):
    path = write(tmp_path / "rows.parquet", [row(i) for i in range(ROWS)])
    read_row_group = pq.ParquetFile.read_row_group

    def failing(self, group, **kwargs):
        if group == 2:
            raise KeyError("an exception type no one expects from a read")
        return read_row_group(self, group, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", failing)
    prompts = read_all([path], builder)
    assert [p.skip_reason for p in prompts] == [None] * 2 * GROUP + ["bad_row"] * GROUP
    assert f"{path} row 11: RowGroupError: row group 2: KeyError" in prompts[11].skip_detail


# --- a source with nothing usable ---------------------------------------------------------------


def test_files_with_no_usable_row_stop_with_one_line_instead_of_reading_forever(tmp_path, builder):
    empty_answers = write(tmp_path / "empty_answers.parquet", [row(i, answer="") for i in range(6)])
    broken_jsonl = tmp_path / "broken.jsonl"
    broken_jsonl.write_text('{"problem": "cut off\n' * 4)
    files = [empty_answers, str(broken_jsonl)]
    with pytest.raises(InputError) as error:
        for _ in itertools.islice(stream(files, builder), 1000):  # the trainer would read forever
            pass
    message = str(error.value)
    assert message.startswith(f"none of the 10 rows of {files} can be used (skipped: ")
    assert "'missing_field': 6" in message and "'bad_row': 4" in message and "\n" not in message
    with pytest.raises(InputError, match="none of the 10 rows"):  # evaluation: one pass, the same line
        read_all(files, builder)
    # Each of two processes reads its own shard, so it sees every row only over several epochs.
    with pytest.raises(InputError, match="none of the 10 rows"):
        for _ in itertools.islice(stream(files, builder, process_index=1, process_count=2), 1000):
            pass


def test_one_usable_row_among_bad_ones_is_read_every_epoch_without_stopping(tmp_path, builder):
    rows = [row(i, answer="" if i else "7") for i in range(ROWS)]  # only row 0 has an answer
    path = write(tmp_path / "mostly_bad.parquet", rows)
    prompts = list(itertools.islice(stream([path], builder), 10 * ROWS))
    assert [p.index for p in prompts if not p.skipped] == [0] * 10


# --- values that would train on garbage ----------------------------------------------------------


def test_an_empty_answer_counts_as_missing(tmp_path, builder):
    # Graded against an empty answer, the empty \boxed{} of a degenerate response scores 1.
    assert accuracy(r"\boxed{}", "") == 1.0 and accuracy(r"\boxed{ }", "  ") == 1.0
    path = write(tmp_path / "answers.parquet", [row(0, ""), row(1, "  \n"), row(2, "0")])
    prompts = read_all([path], builder)
    assert [p.skip_reason for p in prompts] == ["missing_field", "missing_field", None]
    assert prompts[0].skip_detail == "row 0: the answer ('answer') is empty"
    assert prompts[2].answer == "0"


# --- images judged by their size before they are decoded ----------------------------------------


@pytest.fixture
def decodes(monkeypatch) -> list:
    """The sizes of the images PIL decodes (ImageFile.load), in order."""
    decoded, load = [], ImageFile.ImageFile.load

    def counting_load(self):
        if self._im is None:  # not decoded yet
            decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return decoded


def test_an_image_too_large_for_the_prompt_is_skipped_without_being_decoded(tmp_path, decodes):
    huge = png_bytes(Image.new("RGB", (6000, 6000), (200, 30, 30)))  # 36 Mpx, 100 kB as PNG
    thin = png_bytes(Image.new("RGB", (2010, 10), (0, 0, 0)))  # aspect ratio 201: no resize fits it
    path = write(tmp_path / "images.parquet", [row(0), row(1, image=huge), row(2, image=thin)])
    builder = tiny_builder(min_pixels=None, max_pixels=None)  # no recipe budget: the processor's 12.8 Mpx limit
    prompts = read_all([path], builder)
    assert [p.skip_reason for p in prompts] == [None, "too_long", "bad_image"]
    assert "images of 6000x6000 alone give 16384 prompt tokens > max_prompt_length 4096" in prompts[1].skip_detail
    assert "aspect ratio must be smaller than 200" in prompts[2].skip_detail
    assert decodes == [(20, 20)]  # only the usable row's image


def test_image_tokens_from_the_header_equal_those_of_the_processed_image():
    """Whatever the budget does (scale down, scale up, nothing), the count known from the size is
    the number of image tokens the built prompt holds."""
    for budget in (dict(min_pixels=256 * 28 * 28, max_pixels=512 * 28 * 28), dict(min_pixels=None, max_pixels=None)):
        builder = tiny_builder(**budget)
        for width, height in ((1000, 2000), (50, 100), (300, 451), (29, 57)):
            image = random_image(height, width, seed=width)
            assert image.size == (width, height)
            prompt = builder(0, "<image>x", "1", [image])
            pads = int(np.sum(prompt.prompt_ids == builder.special.image_pad))
            assert builder.image_tokens([(width, height)]) == pads, (budget, width, height)


# --- files that cannot be used at all stop at start-up, naming the file -------------------------


def test_files_that_cannot_be_opened_stop_with_one_line_naming_them(tmp_path, builder, monkeypatch):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("problem,answer\n")
    for path in (empty, not_parquet):
        with pytest.raises(InputError) as error:
            data.prompt_dataset([str(path)], builder, seed=0)
        message = str(error.value)
        assert message.startswith(f"{path} cannot be read as a parquet file (ArrowInvalid: ") and "\n" not in message
        assert message.endswith("rewrite the file, or drop it from the data files.")
    monkeypatch.chdir(tmp_path)
    for missing in ("data/train.parquet", "./train.parquet"):
        with pytest.raises(InputError, match=f"^{missing}: no such file"):
            data.prompt_dataset([missing], builder, seed=0)


# --- storage that cannot be used ---------------------------------------------------------------

STORAGE_CHECK = textwrap.dedent(
    """
    import http.server, json, os, sys, threading, time

    status = int(sys.argv[1])

    class Refuse(http.server.BaseHTTPRequestHandler):  # Cloud Storage refusing a caller without credentials
        def do_GET(self):
            body = json.dumps({"error": {"code": status, "message": "Anonymous caller does not have access"}})
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())
            except ConnectionError:  # the client may hang up before reading the body: not our stderr's business
                pass

        do_POST = do_PUT = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1] if status else 1  # 0: a port nothing listens on
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    from vppo_jax.errors import InputError
    from vppo_jax.io import paths

    start = time.monotonic()
    for call in (lambda: paths.exists("gs://b/x.parquet"), lambda: paths.write_text("gs://b/y.txt", "hi")):
        try:
            call()
        except InputError as error:
            print(error)
    print(f"{time.monotonic() - start:.1f}")
    """
)


@pytest.mark.parametrize("status", [401, 403, 0])
def test_storage_failures_name_the_path_and_the_fix_in_one_line_at_once(status):
    """A bucket refusing a caller without credentials (401, 403), and one that cannot be reached.
    A subprocess: gcsfs keeps one filesystem per process for the emulator host it first saw."""
    done = subprocess.run(
        [sys.executable, "-c", STORAGE_CHECK, str(status)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, second, seconds = done.stdout.splitlines()
    assert done.stderr == ""  # no retry log, no traceback
    for line, path in ((first, "gs://b/x.parquet"), (second, "gs://b/y.txt")):
        if status:
            refusal = "HttpError: Anonymous caller does not have access, 401" if status == 401 else "OSError: Forbidden"
            assert line.startswith(f"{path}: access denied ({refusal}")
            assert "`gcloud auth application-default login`" in line
        else:
            assert line.startswith(f"{path}: the storage service 127.0.0.1 cannot be reached (ConnectionRefusedError")
    assert float(seconds) < 5  # gcsfs alone retries for about a minute


# --- a reward module that cannot be imported ----------------------------------------------------


def test_a_reward_module_that_cannot_be_imported_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_reward.py").write_text("def score(response, answer)\n    return 1.0\n")
    (tmp_path / "failing_reward.py").write_text("import no_such_package_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "broken_reward:score": "cannot import broken_reward (SyntaxError: expected ':' (broken_reward.py, line 1))",
        "failing_reward:score": "cannot import failing_reward (ModuleNotFoundError: No module named "
        "'no_such_package_anywhere')",
        "no_such_module:score": "cannot import no_such_module (ModuleNotFoundError: No module named 'no_such_module')",
    }
    for name, problem in cases.items():
        with pytest.raises(InputError) as error:
            rewards.get_reward(name)
        assert str(error.value).startswith(f"reward {name!r}: {problem}. A reward module is found on PYTHONPATH")
    with pytest.raises(InputError, match="^unknown reward 'acuracy'; registered: accuracy"):
        rewards.get_reward("acuracy")
