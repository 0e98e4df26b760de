"""Hugging Face directories in and out: `from_pretrained` and `save_pretrained`.

Tensors stream one at a time (see safetensors_io); every tensor is checked against the
abstract model before anything is loaded, and errors name the offending keys. A directory
may be local or in a bucket (gs://...); a model to read may also be named as on the Hugging
Face Hub (vppo_jax/io/hub.py).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from vppo_jax.io import hub, paths
from vppo_jax.io.atomic_dir import atomic_directory
from vppo_jax.io.safetensors_files import CheckpointError, SafetensorsDirectory, write_sharded
from vppo_jax.models.qwen2_5_vl.config import DTYPES, Qwen2_5_VLConfig
from vppo_jax.models.qwen2_5_vl.image_processor import CLIP_MEAN, CLIP_STD, ImageProcessor
from vppo_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration, abstract_model
from vppo_jax.models.qwen2_5_vl.weights import legacy_name, weight_table

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
FLOAT_DTYPES = ("F32", "BF16", "F16")
# Files of the tokenizer and processor that travel with the weights.
ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    PREPROCESSOR_FILE,
    "video_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def read_config(directory: str) -> tuple[Qwen2_5_VLConfig, dict]:
    path = os.path.join(directory, CONFIG_FILE)
    if not paths.is_file(path):
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}: not a Hugging Face model directory.")
    raw = paths.read_json(path)
    try:
        return Qwen2_5_VLConfig.from_hf_dict(raw), raw
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _check_tensors(files: SafetensorsDirectory, config: Qwen2_5_VLConfig) -> dict[str, str]:
    """Maps every expected legacy name to its key on disk; raises naming missing/unexpected keys."""
    on_disk = {legacy_name(key): key for key in files.keys()}
    expected = {name for entry in weight_table(config) for name in entry.hf_names()}
    missing = sorted(expected - on_disk.keys())
    # A tied checkpoint may still carry lm_head.weight (a copy of the embeddings): tolerate it.
    unexpected = sorted(on_disk.keys() - expected - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing or unexpected:
        raise CheckpointError(
            "The checkpoint's tensors do not match the Qwen2.5-VL config: "
            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)}). "
            "Check that config.json belongs to these weights."
        )
    bad_dtype = sorted(k for k in expected if files.dtype_name(on_disk[k]) not in FLOAT_DTYPES)
    if bad_dtype:
        raise CheckpointError(
            f"Tensors {bad_dtype[:10]} have dtypes {sorted({files.dtype_name(on_disk[k]) for k in bad_dtype})}; "
            f"weights must be one of {FLOAT_DTYPES}."
        )
    return on_disk


def _stored_dtype(files: SafetensorsDirectory, on_disk: dict[str, str]) -> str:
    name = files.dtype_name(on_disk["model.embed_tokens.weight"])
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float32"}[name]


def open_hf_params(
    path: str, dtype: str | None = None, param_dtype: str | None = None
) -> tuple[Qwen2_5_VLConfig, Iterator[tuple[tuple, np.ndarray]]]:
    """Checks an HF directory and returns its config and an iterator of (parameter path, array).

    `dtype` computes, `param_dtype` stores; either alone sets both, neither keeps the stored
    dtype (`Qwen2_5_VLConfig.with_precision`). Every name, shape and dtype is
    checked before the first tensor is read; the iterator then reads one parameter at a
    time (stacked ones filled layer by layer in place), so a consumer that writes each
    parameter away holds at most one in memory. `path` may be a Hub name (downloaded into the
    HF cache first).
    """
    path = hub.resolve_model(path)
    config, _ = read_config(path)
    files = SafetensorsDirectory(path)
    on_disk = _check_tensors(files, config)
    config = config.with_dtypes(_stored_dtype(files, on_disk)).with_precision(dtype, param_dtype)
    config = dataclasses.replace(config, source_dir=paths.absolute(path))
    param_dtype = config.param_dtype
    shapes = param_shapes(config)
    table = weight_table(config)
    for entry in table:
        want = shapes[entry.path][0][1:] if entry.layers else shapes[entry.path][0]
        for name in entry.hf_names():
            got = entry.transform.hf_shape(want)
            if files.shape(on_disk[name]) != got:
                raise CheckpointError(
                    f"tensor {on_disk[name]!r} has shape {files.shape(on_disk[name])}, but this config needs "
                    f"{got} (parameter {'.'.join(entry.path)})."
                )

    def parameters():
        for entry in tqdm(table, desc=f"reading {path}", unit="param", disable=None, leave=False):
            shape, _ = shapes[entry.path]
            value = np.empty(shape, np.dtype(DTYPES[param_dtype]))
            for i, name in enumerate(entry.hf_names()):
                value[i if entry.layers else ...] = entry.transform.to_jax(files.read(on_disk[name]))
            yield entry.path, value

    return config, parameters()


def param_shapes(config: Qwen2_5_VLConfig) -> dict[tuple, tuple[tuple[int, ...], np.dtype]]:
    """{parameter path: (shape, dtype)} of the model this config describes, nothing allocated."""
    flat = nnx.to_flat_state(nnx.state(abstract_model(config)))
    return {p: (v.get_value().shape, np.dtype(v.get_value().dtype)) for p, v in flat}


def model_from_params(config: Qwen2_5_VLConfig, params: Iterable[tuple[tuple, np.ndarray]]):
    """Builds the model from (path, array) pairs, moving each array to the device as it comes."""
    graphdef, state = nnx.split(abstract_model(config))
    flat = dict(nnx.to_flat_state(state))
    for path, value in params:
        flat[path] = flat[path].replace(value=jax.numpy.asarray(value))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_pretrained(
    path: str, dtype: str | None = None, param_dtype: str | None = None
) -> Qwen2_5_VLForConditionalGeneration:
    """Loads an HF Qwen2.5-VL directory (local, gs://..., or a Hub name). `dtype` computes,
    `param_dtype` stores (fp32 master weights under bf16 compute: dtype="bfloat16",
    param_dtype="float32"); either alone sets both; default: as stored."""
    return model_from_params(*open_hf_params(path, dtype, param_dtype))


def hf_config_dict(config: Qwen2_5_VLConfig) -> dict:
    """The config.json to write: the source's (when loaded from HF) with the dtype updated."""
    from_source = config.source_dir and paths.is_file(os.path.join(config.source_dir, CONFIG_FILE))
    raw = read_config(config.source_dir)[1] if from_source else config_to_hf_dict(config)
    raw["torch_dtype"] = raw["dtype"] = config.param_dtype
    return raw


def config_to_hf_dict(config: Qwen2_5_VLConfig) -> dict:
    """An HF config.json for a model built here (for instance the tiny default model)."""
    from transformers import Qwen2_5_VLConfig as HFConfig

    v, t = config.vision, config.text
    hf = HFConfig(
        text_config=dict(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            rms_norm_eps=t.rms_norm_eps,
            hidden_act=t.hidden_act,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": list(t.mrope_section),
            },
            bos_token_id=None,
            eos_token_id=None,  # Qwen's ids do not exist in small test vocabularies
        ),
        vision_config=dict(
            depth=v.depth,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_heads=v.num_heads,
            out_hidden_size=v.out_hidden_size,
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            hidden_act=v.hidden_act,
            in_channels=v.in_channels,
        ),
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    raw = hf.to_dict()
    raw["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    return raw


def save_params_as_hf(
    config: Qwen2_5_VLConfig,
    shapes: dict[tuple, tuple[tuple[int, ...], np.dtype]],
    load: Callable[[tuple], np.ndarray],
    directory: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
):
    """Writes parameters as legacy-named safetensors, one tensor at a time.

    `load(path)` is called once per parameter, in table order, and only one parameter is
    held at a time: parameters can stream from a checkpoint on disk.
    """
    specs, source = [], {}
    for entry in weight_table(config):
        shape, dtype = shapes[entry.path]
        for i, name in enumerate(entry.hf_names()):
            specs.append((name, entry.transform.hf_shape(shape[1:] if entry.layers else shape), dtype))
            source[name] = (entry, i)
    progress = tqdm(total=len(specs), desc=f"writing {directory}", unit="tensor", disable=None, leave=False)
    current: dict = {}  # the one parameter in memory

    def produce(name):
        progress.update()
        entry, i = source[name]
        if entry.path not in current:
            current.clear()
            current[entry.path] = np.asarray(load(entry.path))
        value = current[entry.path]
        return entry.transform.to_hf(value[i] if entry.layers else value)

    write_sharded(directory, specs, produce, max_shard_bytes)
    progress.close()


def copy_assets(source: str | None, directory: str):
    """The tokenizer and processor files of `source`, and a preprocessor_config.json where it has
    none: AutoProcessor needs one (it names the processor class) to load the directory."""
    for name in ASSET_FILES if source else ():
        if paths.is_file(os.path.join(source, name)):
            paths.copy_file(os.path.join(source, name), os.path.join(directory, name))
    if not (source and paths.is_file(os.path.join(source, PREPROCESSOR_FILE))):
        # Without the file, the model was fed with ImageProcessor's defaults (the released model's).
        paths.write_json(os.path.join(directory, PREPROCESSOR_FILE), preprocessor_config(ImageProcessor()))


def preprocessor_config(processor: ImageProcessor) -> dict:
    """The preprocessor_config.json of transformers' Qwen2.5-VL processor that processes images
    as `processor` does (the released model's file, when `processor` has its defaults)."""
    return {
        "min_pixels": processor.min_pixels,
        "max_pixels": processor.max_pixels,
        "patch_size": processor.patch_size,
        "temporal_patch_size": processor.temporal_patch_size,
        "merge_size": processor.merge_size,
        "image_mean": [float(str(v)) for v in CLIP_MEAN],  # the shortest decimals of the float32 values
        "image_std": [float(str(v)) for v in CLIP_STD],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }


def write_hf_directory(
    config: Qwen2_5_VLConfig,
    shapes: dict[tuple, tuple[tuple[int, ...], np.dtype]],
    load: Callable[[tuple], np.ndarray],
    path: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
):
    """Writes a complete HF directory atomically: safetensors, tokenizer files, then config.json
    (last, so that in a bucket, where a foreign HF directory has no completion marker, a
    directory with config.json is a whole one)."""
    with atomic_directory(path) as tmp:
        save_params_as_hf(config, shapes, load, tmp, max_shard_bytes)
        copy_assets(config.source_dir, tmp)
        paths.write_json(os.path.join(tmp, CONFIG_FILE), hf_config_dict(config))


def save_pretrained(
    model: Qwen2_5_VLForConditionalGeneration, path: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
):
    """Writes a directory that transformers' `from_pretrained` loads (legacy tensor names)."""
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    shapes = {p: (v.shape, np.dtype(v.dtype)) for p, v in flat.items()}
    write_hf_directory(model.config, shapes, flat.__getitem__, path, max_shard_bytes)
