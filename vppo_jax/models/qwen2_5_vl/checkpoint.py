"""Model weights as an orbax checkpoint, the format training starts from.

Layout of a converted checkpoint directory:
    params/   orbax PyTree of the parameters (the pure dict of nnx.state(model, nnx.Param))
    hf/       config.json (with "dtype" set to the parameter dtype) and the tokenizer and
              processor files, so the model converts back to an identical HF directory.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from vppo_jax.atomic_dir import atomic_directory
from vppo_jax.models.qwen2_5_vl.hf_io import CONFIG_FILE, copy_assets, hf_config_dict, read_config
from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from vppo_jax.models.qwen2_5_vl.model import abstract_model
from vppo_jax.safetensors_io import CheckpointError

PARAMS_DIR, HF_DIR = "params", "hf"


def _nested(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def save_params(config: Qwen2_5_VLConfig, params: dict, path: str):
    """Writes {parameter path: array} and the config as an orbax checkpoint directory."""
    with atomic_directory(path) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), _nested(params))
        checkpointer.wait_until_finished()
        os.makedirs(os.path.join(tmp, HF_DIR))
        with open(os.path.join(tmp, HF_DIR, CONFIG_FILE), "w") as f:
            json.dump(hf_config_dict(config), f, indent=2)
        copy_assets(config.source_dir, os.path.join(tmp, HF_DIR))


def load_params(path: str) -> tuple[Qwen2_5_VLConfig, dict]:
    """Reads a checkpoint written by `save_params` into (config, {parameter path: array})."""
    params_dir, hf_dir = os.path.join(path, PARAMS_DIR), os.path.join(path, HF_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{path} has no {PARAMS_DIR}/ folder: not a checkpoint written by save_params.")
    config, raw = read_config(hf_dir)
    config = dataclasses.replace(config.with_dtypes(raw.get("dtype") or "float32"), source_dir=os.path.abspath(hf_dir))
    state = nnx.state(abstract_model(config))
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nnx.to_pure_dict(state))
    try:
        restored = ocp.StandardCheckpointer().restore(os.path.abspath(params_dir), target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{params_dir} does not match the model described by {hf_dir}/config.json: {e}") from e
    nnx.replace_by_pure_dict(state, restored)
    return config, {p: v.get_value() for p, v in nnx.to_flat_state(state)}
