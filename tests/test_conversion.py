"""HF <-> JAX conversion: bit-exact round trips, transformers loading our exports, clear errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from scripts import convert_hf_to_jax, convert_jax_to_hf
from vppo_jax.io.safetensors_files import CheckpointError
from vppo_jax.models import qwen2_5_vl

from hf_reference import hf_logits, processor_batch, text_ids, tiny_hf_model

BATCH = processor_batch([(text_ids(7, 0), [(56, 84)]), (text_ids(12, 1), [(112, 140)])])
ASSETS = {"tokenizer_config.json": '{"model_max_length": 128}', "preprocessor_config.json": '{"min_pixels": 3136}'}


def all_tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        # Compare the raw bytes: bit-identical, not merely equal as numbers.
        assert torch.equal(a[key].contiguous().view(torch.uint8), b[key].contiguous().view(torch.uint8)), key


def hf_directory(tmp_path, dtype=torch.float32, tied=False, **save_kwargs):
    model = tiny_hf_model(seed=3, dtype=dtype, tied=tied)
    path = tmp_path / "source"
    model.save_pretrained(path, **save_kwargs)
    for name, text in ASSETS.items():
        (path / name).write_text(text)
    return model, path


def no_output_left(path) -> bool:
    siblings = os.listdir(path.parent)
    return not path.exists() and not any(name.startswith(f".{path.name}.") for name in siblings)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_is_bit_identical_and_loads_in_transformers(tmp_path, dtype):
    _, source = hf_directory(tmp_path, dtype=dtype)
    model = qwen2_5_vl.from_pretrained(str(source))
    qwen2_5_vl.save_pretrained(model, str(tmp_path / "export"))
    assert_bit_identical(all_tensors(source), all_tensors(tmp_path / "export"))
    for name, text in ASSETS.items():
        assert (tmp_path / "export" / name).read_text() == text
    # Both loaded the same way: a model cast in memory with .to(bf16) also casts rotary buffers.
    exported = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "export", dtype=dtype).eval()
    original = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=dtype).eval()
    assert (hf_logits(exported, BATCH) == hf_logits(original, BATCH)).all()


def test_scripts_round_trip_through_orbax_with_sharded_output(tmp_path):
    source_model, source = hf_directory(tmp_path, tied=True)
    assert convert_hf_to_jax.convert(str(source), str(tmp_path / "jax")) == 0
    assert convert_jax_to_hf.convert(str(tmp_path / "jax"), str(tmp_path / "hf"), max_shard_gb=200e3 / 1024**3) == 0
    export = tmp_path / "hf"
    assert (export / "model.safetensors.index.json").exists()
    assert len([n for n in os.listdir(export) if n.endswith(".safetensors")]) > 1
    assert_bit_identical(all_tensors(source), all_tensors(export))
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(export).eval()
    assert (hf_logits(reloaded, BATCH) == hf_logits(source_model, BATCH)).all()


def test_export_in_another_dtype_is_the_torch_cast_of_the_stored_weights(tmp_path):
    _, source = hf_directory(tmp_path)  # fp32
    assert convert_hf_to_jax.convert(str(source), str(tmp_path / "jax")) == 0
    assert convert_jax_to_hf.convert(str(tmp_path / "jax"), str(tmp_path / "hf"), dtype="bfloat16") == 0
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in all_tensors(source).items()}
    assert_bit_identical(expected, all_tensors(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_input_with_index_loads(tmp_path):
    source_model, source = hf_directory(tmp_path, max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").exists()
    model = qwen2_5_vl.from_pretrained(str(source))
    real = BATCH["attention_mask"].astype(bool)
    assert abs(hf_logits(source_model, BATCH) - model(**BATCH))[real].max() <= 1e-4


def test_transformers5_tensor_names_are_accepted(tmp_path):
    source_model, source = hf_directory(tmp_path)
    tensors = load_file(source / "model.safetensors")
    renamed = {
        (
            "model.language_model." + k[len("model.") :]
            if k.startswith("model.")
            else "model." + k
            if k.startswith("visual.")
            else k
        ): v
        for k, v in tensors.items()
    }
    save_file(renamed, source / "model.safetensors", metadata={"format": "pt"})
    model = qwen2_5_vl.from_pretrained(str(source))
    real = BATCH["attention_mask"].astype(bool)
    assert abs(hf_logits(source_model, BATCH) - model(**BATCH))[real].max() <= 1e-4


def corrupt_config(path):
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(config))


def drop_tensor(path):
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def add_tensor(path):
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.9.extra.weight"] = torch.zeros(3)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def wrong_shape(path):
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def wrong_dtype(path):
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int64)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (corrupt_config, "not hold a Qwen2.5-VL"),
        (drop_tensor, "missing ['model.layers.1.mlp.up_proj.weight']"),
        (add_tensor, "unexpected ['model.layers.9.extra.weight']"),
        (wrong_shape, "'model.layers.0.self_attn.q_proj.weight' has shape (64, 32)"),
        (wrong_dtype, "['model.norm.weight'] have dtypes ['I64']"),
        (truncate, "truncated"),
    ],
    ids=["not_qwen", "missing_tensor", "unexpected_tensor", "shape_mismatch", "dtype_mismatch", "truncated_file"],
)
def test_bad_checkpoints_fail_clearly_and_leave_nothing(tmp_path, capsys, corrupt, message):
    _, source = hf_directory(tmp_path)
    corrupt(source)
    with pytest.raises(CheckpointError) as error:
        qwen2_5_vl.from_pretrained(str(source))
    assert message in str(error.value)
    out = tmp_path / "jax"
    assert convert_hf_to_jax.convert(str(source), str(out)) == 2
    assert message in capsys.readouterr().err
    assert no_output_left(out)


def test_missing_shard_fails_clearly(tmp_path):
    _, source = hf_directory(tmp_path, max_shard_size="100KB")
    shards = sorted(n for n in os.listdir(source) if n.endswith(".safetensors"))
    os.remove(source / shards[1])
    with pytest.raises(CheckpointError, match=f"shard file.*{shards[1]}.*missing"):
        qwen2_5_vl.from_pretrained(str(source))


def test_existing_output_is_never_overwritten(tmp_path):
    _, source = hf_directory(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert convert_hf_to_jax.convert(str(source), str(tmp_path / "taken")) == 2
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_failure_while_writing_leaves_no_partial_directory(tmp_path, monkeypatch):
    _, source = hf_directory(tmp_path)
    model = qwen2_5_vl.from_pretrained(str(source))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vppo_jax.models.qwen2_5_vl.hf_io.copy_assets", fail)
    with pytest.raises(OSError, match="disk full"):
        qwen2_5_vl.save_pretrained(model, str(tmp_path / "export"))
    assert no_output_left(tmp_path / "export")
