"""python -m vppo_jax.data.prepare: each dataset, laid out as its hub repository publishes it
(docs/datasets.md), converts to the exact rows expected, malformed rows are skipped and
counted, the output is written whole or not at all, and the project's own readers take it.

The fixtures use the published column names, row layouts and image encodings; the question
texts are illustrative (what each benchmark asks, in its answer format: a letter for
multiple choice, a number or expression otherwise).
"""

import io
import json
import os
import subprocess
import sys
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vppo_jax import data
from vppo_jax.data.prepare import convert, writer
from vppo_jax.data.prepare.convert import prepare
from vppo_jax.data.prepare.example import PrepareError
from vppo_jax.data.prepare.image_files import ImageFiles
from vppo_jax.data.prepare.registry import DATASETS
from vppo_jax.data.prompts import INSTRUCTION
from vppo_jax.eval import benchmarks
from vppo_jax.trainer import config as config_lib

from hub_cache import cache_repo, go_offline
from test_processing import tiny_builder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROKEN_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20  # a PNG signature and nothing decodable


def png(seed: int, size=(6, 5)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed * 40 % 256, 90, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the PAPO evaluation suite: LLaMA-Factory ShareGPT rows, images as files ------------------

# name -> the benchmark's good rows, (question, answer, number of images); the user turn is the
# question, "\n\n" and the instruction, as the suite writes it.
BENCHMARK_ROWS = {
    "mathverse": [
        (
            "<image>As shown in the figure, AB is parallel to CD and angle 1 = 50°. Find angle 2.\n"
            "Choices:\nA:40°\nB:50°\nC:130°\nD:140°",
            "C",
            1,
        ),
        ("<image>Find the area of the shaded region.\nChoices:\nA:2π\nB:4π\nC:8π\nD:16π", "B", 1),
    ],
    "dynamath": [
        ("<image>What is the y-intercept of the line shown?", "-2", 1),
        ("<image>Is the graph convex?\nChoices: (A) yes (B) no", "A", 1),
    ],
    "mmk12": [("<image>In right triangle ABC, angle C = 90°, AC = 2 and AB = 4. Find BC.", "2\\sqrt{3}", 1)],
    "geo3k": [("<image>Find x. Round to the nearest tenth.", "8.5", 1), ("<image>Find $m \\angle B$.", "48", 1)],
    "mathvision": [
        ("<image>Which shape comes next?\n\nChoices: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5", "B", 1),
        ("<image>How many triangles are in the picture?", "7", 1),
    ],
    "wemath": [("<image>As shown, what is the length of AB? ()\nA. 4cm\nB. 5cm\nC. 6cm\nD. No correct answer", "B", 1)],
    "logicvista": [("<image>Which of the boxes A, B, C or D comes next in the sequence?", "C", 1)],
    # MMMU-Pro's vision setting puts the whole question in the image; a second row has two images.
    "mmmu_pro": [("<image>", "D", 1), ("<image> shows the circuit before, <image> after. Which part failed?", "A", 2)],
}
SUITE_FILES = {  # name -> (published data file, where the images are: a zip archive or a folder)
    name: (dataset.data_files[0].replace("*", "00000-of-00001"), dataset.image_files[0])
    for name, dataset in DATASETS.items()
    if name != "virl39k"
}


def sharegpt_row(question, answer, images, instruction="\n\n" + INSTRUCTION):
    user = {"role": "user", "content": question + instruction}
    return {"messages": [user, {"role": "assistant", "content": answer}], "images": images}


def write_suite_snapshot(root, name):
    """The benchmark's hub repository as `hf download` leaves it: its good rows, then one of each
    malformed kind; returns (the rows expected out, the number of rows)."""
    data_file, image_location = SUITE_FILES[name]
    root.mkdir(parents=True)
    folder = image_location.removesuffix("_images.zip").removesuffix("/*").split("/")[-1]
    ref = lambda i: f"./data/images/{folder}/{folder}_{i}_0.png"  # how the suite's rows name their images
    good = [(question, answer, count, "\n\n" + INSTRUCTION) for question, answer, count in BENCHMARK_ROWS[name]]
    good += [
        ("<image>Find the perimeter.", "12", 1, ""),  # a question without the instruction is kept whole
        ("<image>Find the area.", "9", 1, "\n" + INSTRUCTION),  # the single-newline variant
    ]
    files, rows, expected = {ref("broken"): BROKEN_PNG}, [], []
    for i, (question, answer, count, instruction) in enumerate(good):
        paths = [ref(f"{i}-{k}") for k in range(count)]
        files.update({path: png(i * 3 + k) for k, path in enumerate(paths)})
        rows.append(sharegpt_row(question, answer, paths, instruction))
        expected.append({"problem": question, "answer": answer, "images": [files[p] for p in paths]})
    rows += [
        {"messages": [{"role": "user", "content": "<image>Find x." + INSTRUCTION}], "images": [ref("0-0")]},
        sharegpt_row("", "3", [ref("0-0")]),  # nothing but the instruction
        sharegpt_row("<image>Find y.", "4", [ref("not-shipped")]),
        sharegpt_row("<image>Find z.", "5", [ref("broken")]),
        sharegpt_row("<image>Compare <image>.", "6", [ref("0-0")]),
    ]
    members = {path.removeprefix("./data/images/"): content for path, content in files.items()}
    if image_location.endswith(".zip"):  # PAPO_eval: one archive of <folder>/<file> at the repository root
        with zipfile.ZipFile(root / image_location, "w") as archive:
            for member, content in members.items():
                archive.writestr(member, content)
    else:  # VPPO-Eval: loose files under data/images/<folder>/
        for member, content in members.items():
            (root / "data" / "images" / member).parent.mkdir(parents=True, exist_ok=True)
            (root / "data" / "images" / member).write_bytes(content)
    (root / data_file).parent.mkdir(parents=True, exist_ok=True)
    if data_file.endswith(".json"):  # VPPO-Eval: LLaMA-Factory's JSON array, which can also hold a row of another shape
        rows.append({"messages": "<image>Find w.", "images": [ref("0-0")]})
        (root / data_file).write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    else:  # PAPO_eval: the parquet of an HF datasets split, with the id column added on upload
        pq.write_table(
            pa.Table.from_pylist([{**row, "id": f"{folder}_{i}"} for i, row in enumerate(rows)]), root / data_file
        )
    return expected, len(rows)


def read_output(path):
    rows = pq.read_table(path).to_pylist()
    return [{**row, "images": [image["bytes"] for image in row["images"]]} for row in rows]


@pytest.mark.parametrize("name", sorted(SUITE_FILES))
def test_benchmark_converts_from_its_published_layout(tmp_path, name):
    expected, rows = write_suite_snapshot(tmp_path / "snapshot", name)
    report = prepare(DATASETS[name], [str(tmp_path / "snapshot")], str(tmp_path / "out"))

    assert read_output(tmp_path / "out" / f"{name}.parquet") == expected
    assert all(
        image["path"] is None
        for row in pq.read_table(tmp_path / "out" / f"{name}.parquet").to_pylist()
        for image in row["images"]
    )
    assert report["written"] == len(expected) and report["rows_read"] == rows
    skipped = dict(missing_answer=1, missing_problem=1, missing_image=1, bad_image=1, image_mismatch=1)
    assert report["skipped"] == {"bad_row": rows - len(expected) - 5, **skipped}
    assert report["notes"] == {"instruction_removed": len(expected) - 1}
    assert json.loads((tmp_path / "out" / f"{name}.prepare.json").read_text()) == report


# --- ViRL39K: the EasyR1 layout, images embedded ----------------------------------------------


def write_virl39k_snapshot(root):
    """chamber111/VPPO_ViRL39K_train: data/train-*.parquet shards of problem, answer and images
    as HF datasets image structs; returns the rows expected out."""
    good = [
        ("<image>Find the value of x in the triangle.", "60", [png(1)]),
        ("What fraction of the figure is shaded?", "\\frac{3}{8}", [png(2)]),  # images before the text
        ("<image>\n<image>\nWhich bar chart shows the larger total?", "B", [png(3), png(4)]),
    ]
    image = lambda content: {"bytes": content, "path": None}  # noqa: E731
    bad = [
        {"problem": "<image>How many?", "answer": None, "images": [image(png(5))]},
        {"problem": " ", "answer": "1", "images": [image(png(5))]},
        {"problem": "<image>How many?", "answer": "2", "images": []},
        {"problem": "<image>How many?", "answer": "2", "images": [{"bytes": None, "path": "gone.png"}]},
        {"problem": "<image>How many?", "answer": "3", "images": [image(BROKEN_PNG)]},
        {"problem": "<image><image>How many?", "answer": "4", "images": [image(png(5))]},
    ]
    rows = [{"problem": p, "answer": a, "images": [image(b) for b in images]} for p, a, images in good] + bad
    (root / "data").mkdir(parents=True)
    for shard, part in enumerate((rows[:4], rows[4:])):
        pq.write_table(pa.Table.from_pylist(part), root / "data" / f"train-0000{shard}-of-00002.parquet")
    return [{"problem": p, "answer": a, "images": images} for p, a, images in good], len(rows)


def test_virl39k_converts_from_its_published_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "ROW_GROUP_ROWS", 2)
    expected, rows = write_virl39k_snapshot(tmp_path / "snapshot")
    report = prepare(DATASETS["virl39k"], [str(tmp_path / "snapshot")], str(tmp_path / "out"))

    output = tmp_path / "out" / "virl39k.parquet"
    assert read_output(output) == expected
    assert pq.ParquetFile(output).metadata.num_row_groups == 2  # 3 rows in groups of 2
    assert report["written"] == 3 and report["rows_read"] == rows
    skipped = dict(bad_row=0, missing_answer=1, missing_problem=1, missing_image=2, bad_image=1, image_mismatch=1)
    assert report["skipped"] == skipped and report["notes"] == {}


# --- the source, the output, the command ------------------------------------------------------


def test_the_default_source_is_the_hub_id_resolved_through_the_cache(tmp_path, monkeypatch):
    expected, _ = write_virl39k_snapshot(tmp_path / "download")
    files = {str(path.relative_to(tmp_path / "download")): str(path) for path in (tmp_path / "download").rglob("*.*")}
    go_offline(monkeypatch, str(tmp_path / "home"))
    virl39k = DATASETS["virl39k"]
    with pytest.raises(PrepareError, match=f"(?s){virl39k.hub_id}.*HF_HUB_OFFLINE.*hf download {virl39k.hub_id}"):
        prepare(virl39k, [virl39k.hub_id], str(tmp_path / "out"))  # not in the cache yet
    cache_repo(tmp_path / "home" / "hub", "dataset", virl39k.hub_id, files)
    prepare(virl39k, [virl39k.hub_id], str(tmp_path / "out"))
    assert read_output(tmp_path / "out" / "virl39k.parquet") == expected


def test_unusable_sources_fail_at_once_saying_why(tmp_path):
    write_virl39k_snapshot(tmp_path / "virl")
    with pytest.raises(
        PrepareError, match=r"no column \['messages'\]; its columns are \['problem', 'answer', 'images'\]"
    ):
        prepare(DATASETS["geo3k"], [str(tmp_path / "virl" / "data" / "train-00000-of-00002.parquet")], str(tmp_path))
    with pytest.raises(PrepareError, match="hf download PAPO-Galaxy/PAPO_eval --repo-type dataset"):
        prepare(DATASETS["geo3k"], [str(tmp_path / "virl")], str(tmp_path / "out"))  # no geo3k file in it
    write_suite_snapshot(tmp_path / "broken", "geo3k")
    (tmp_path / "broken" / "hiyouga_geometry3k_images.zip").write_bytes(b"cut short by a failed download")
    with pytest.raises(PrepareError, match="hiyouga_geometry3k_images.zip is not a readable zip archive"):
        prepare(DATASETS["geo3k"], [str(tmp_path / "broken")], str(tmp_path / "out"))
    (tmp_path / "broken" / "data" / "hiyouga_geometry3k-00000-of-00001.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(PrepareError, match="hiyouga_geometry3k-00000-of-00001.parquet is not a readable parquet"):
        prepare(DATASETS["geo3k"], [str(tmp_path / "broken")], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_data_files_can_be_named_with_their_image_folder(tmp_path):
    """A data file outside its snapshot, here rewritten as JSON lines with a line cut short: images
    are looked up beside it and in the directories given."""
    expected, rows = write_suite_snapshot(tmp_path / "snapshot", "dynamath")
    published = tmp_path / "snapshot" / "data" / "vppo" / "DynaMath_DynaMath_Sample.json"
    data_file = tmp_path / "elsewhere" / "dynamath.jsonl"
    data_file.parent.mkdir()
    lines = [json.dumps(row) for row in json.loads(published.read_text())]
    data_file.write_text("\n".join([*lines, lines[0][:20]]) + "\n")
    src = [str(data_file), str(tmp_path / "snapshot" / "data" / "images")]
    report = prepare(DATASETS["dynamath"], src, str(tmp_path / "out"))
    assert read_output(tmp_path / "out" / "dynamath.parquet") == expected
    assert report["rows_read"] == rows + 1 and report["skipped"]["bad_row"] == 2


def test_image_references_match_the_longest_tail_of_their_path(tmp_path):
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(png(seed))
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.writestr("a/x.png", png(3))  # the archive of which a/ is the unpacked copy
        archive.writestr("d/y.png", png(4))
    with ImageFiles([str(tmp_path)]) as images:
        assert images.read("./data/images/a/x.png") == png(1)  # the unpacked file, not the archive member
        assert images.read("b/x.png") == png(2)
        assert images.read("./data/images/d/y.png") == images.read("y.png") == png(4)
        with pytest.raises(FileNotFoundError, match="matches 'x.png'"):
            images.read("x.png")  # a bare name that two files share names neither
        with pytest.raises(FileNotFoundError):
            images.read("./data/images/c/z.png")


def test_output_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    write_suite_snapshot(tmp_path / "snapshot", "geo3k")
    build = convert.build_example
    calls = []

    def crash_on_second_row(fields, images):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # not a row's fault: the run stops
        return build(fields, images)

    monkeypatch.setattr(convert, "build_example", crash_on_second_row)
    with pytest.raises(KeyboardInterrupt):
        prepare(DATASETS["geo3k"], [str(tmp_path / "snapshot")], str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []  # no parquet, no partial file, no report

    monkeypatch.setattr(convert, "build_example", build)
    prepare(DATASETS["geo3k"], [str(tmp_path / "snapshot")], str(tmp_path / "out"))
    with pytest.raises(FileExistsError, match="geo3k.parquet already exists"):
        prepare(DATASETS["geo3k"], [str(tmp_path / "snapshot")], str(tmp_path / "out"))


def test_no_usable_row_is_an_error_and_writes_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    rows = [sharegpt_row("<image>Find x.", "1", ["./data/images/absent.png"])] * 3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "hiyouga_geometry3k-00000-of-00001.parquet")
    with pytest.raises(PrepareError, match=r"none of the 3 rows .* \{'missing_image': 3\}"):
        prepare(DATASETS["geo3k"], [str(tmp_path)], str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


def test_the_command_prints_the_counts_and_errors_in_one_line(tmp_path):
    write_suite_snapshot(tmp_path / "snapshot", "logicvista")
    command = [sys.executable, "-m", "vppo_jax.data.prepare", "logicvista", f"--out={tmp_path / 'out'}"]
    done = subprocess.run([*command, f"--src={tmp_path / 'snapshot'}"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "logicvista: wrote 3 of 8 rows" in done.stdout and "'missing_image': 1" in done.stdout
    assert "the published PAPO-Galaxy/PAPO_eval split has 447 rows" in done.stdout

    again = subprocess.run([*command, f"--src={tmp_path / 'snapshot'}"], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1  # one line, no traceback
    unknown = subprocess.run([*command[:3], "mathvista", "--out=x"], cwd=REPO, capture_output=True, text=True)
    assert unknown.returncode == 2 and "one of virl39k, mathverse," in unknown.stderr


# --- the project's readers take the output as it is --------------------------------------------


def test_prepared_files_are_read_by_the_data_pipeline_and_the_evaluation(tmp_path):
    write_virl39k_snapshot(tmp_path / "virl")
    write_suite_snapshot(tmp_path / "suite", "mmmu_pro")
    train = prepare(DATASETS["virl39k"], [str(tmp_path / "virl")], str(tmp_path / "data"))["output"]
    benchmark = prepare(DATASETS["mmmu_pro"], [str(tmp_path / "suite")], str(tmp_path / "data" / "benchmarks"))[
        "output"
    ]
    builder = tiny_builder()

    prompts = list(data.prompt_dataset([train], builder, seed=0, num_epochs=1, shuffle=False))
    assert [p.answer for p in prompts] == ["60", "\\frac{3}{8}", "B"] and not any(p.skipped for p in prompts)
    assert [len(p.image_grid_thw) for p in prompts] == [1, 1, 2]

    assert benchmarks.benchmark_name(benchmark) == "mmmu_pro"
    skips = data.SkipCounter()
    chunks = list(benchmarks.prompt_chunks(benchmark, builder, config_lib.default_config(), 16, 0, skips))
    assert [p.answer for chunk in chunks for p in chunk] == ["D", "A", "12", "9"] and not skips.counts
