"""Model weights as an orbax checkpoint, the format training starts from.

Layout of a converted checkpoint directory:
    params/   orbax PyTree of the parameters (nested like nnx.to_pure_dict of the model)
    hf/       config.json (with "dtype" set to the parameter dtype) and the tokenizer and
              processor files, so the model converts back to an identical HF directory.

Parameters are saved one at a time with orbax's partial save and loaded one at a time
with partial load, so converting never holds the whole model: a plain orbax save of
the whole tree costs a second copy of it in host buffers (measured: 2.1x the
checkpoint size instead of 1.0x).

The directory may be local or in a bucket (gs://...): it is read through orbax and
vppo_jax/io/paths.py, which take either; vppo_jax/io/atomic_dir.py says what "complete" means
in each.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Iterable

import jax
import numpy as np
from orbax.checkpoint.experimental import v1 as ocp

from vppo_jax.io import paths
from vppo_jax.io.atomic_dir import atomic_directory, is_complete
from vppo_jax.io.safetensors_files import CheckpointError
from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from vppo_jax.models.qwen2_5_vl.hf_io import (
    CONFIG_FILE,
    copy_assets,
    hf_config_dict,
    model_from_params,
    param_shapes,
    read_config,
)

PARAMS_DIR, HF_DIR = "params", "hf"
# The parameter whose stored dtype is the checkpoint's (as `open_hf_params` reads it).
EMBEDDINGS = ("language_model", "embed_tokens")


def _nested(path: tuple, value) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


def save_params(config: Qwen2_5_VLConfig, params: Iterable[tuple[tuple, np.ndarray]], path: str):
    """Writes (parameter path, array) pairs and the config as a checkpoint directory.

    Orbax's partial save renames directories as it merges each parameter in, which an object
    store cannot do: a checkpoint for a bucket is written to a local temporary directory
    first (local disk for one checkpoint) and uploaded once complete.
    """
    with atomic_directory(path) as directory:
        if paths.is_local(directory):
            _write_checkpoint(config, params, directory)
        else:
            with tempfile.TemporaryDirectory(prefix="vppo_checkpoint.") as spool:
                _write_checkpoint(config, params, spool)
                paths.copy_tree(spool, directory)


def _write_checkpoint(config: Qwen2_5_VLConfig, params: Iterable[tuple[tuple, np.ndarray]], directory: str):
    params_dir = os.path.join(directory, PARAMS_DIR)
    for param_path, value in params:
        ocp.partial.save(params_dir, _nested(param_path, value))
    ocp.partial.finalize(params_dir)
    os.makedirs(os.path.join(directory, HF_DIR))
    paths.write_json(os.path.join(directory, HF_DIR, CONFIG_FILE), hf_config_dict(config))
    copy_assets(config.source_dir, os.path.join(directory, HF_DIR))


@dataclasses.dataclass(frozen=True)
class StoredParams:
    """Where a model's parameters lie in an orbax checkpoint: the PyTree at `directory` (item
    `item` of a composite checkpoint, such as a training run's "state"), parameter `p` under the
    key `prefix + p + suffix`."""

    directory: str
    item: str | None = None
    prefix: tuple = ()
    suffix: tuple = ()

    def key(self, param_path: tuple) -> tuple:
        return (*self.prefix, *param_path, *self.suffix)

    def _item(self) -> dict:
        return {"checkpointable_name": self.item} if self.item else {}

    def leaves(self) -> dict[tuple, tuple[tuple[int, ...], np.dtype]]:
        """{key: (shape, dtype)} of the arrays under `prefix`, from the tree's metadata (no array is read)."""
        tree = ocp.metadata(self.directory, **self._item()).metadata
        for key in self.prefix:  # the parameters' subtree: a run's optimizer state is never looked at
            tree = tree.get(key, {})
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
        return {
            (*self.prefix, *(k.key for k in path)): (tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in flat
        }

    def load(self, param_path: tuple, abstract: jax.ShapeDtypeStruct):
        """One parameter, alone: orbax's partial load reads no other array."""
        context = ocp.Context()
        context.pytree.loading.partial_load = True
        with context:
            tree = ocp.load(self.directory, _nested(self.key(param_path), abstract), **self._item())
        for key in self.key(param_path):
            tree = tree[key]
        return tree


def open_params(path: str, dtype: str | None = None, param_dtype: str | None = None):
    """(config, {parameter path: (shape, dtype)}, load) for a checkpoint written by `save_params`;
    `load(p)` reads one parameter. As `open_stored_params`."""
    params_dir, hf_dir = os.path.join(path, PARAMS_DIR), os.path.join(path, HF_DIR)
    if not paths.is_dir(params_dir):
        raise CheckpointError(f"{path} has no {PARAMS_DIR}/ folder: not a checkpoint written by save_params.")
    if not is_complete(path):
        raise CheckpointError(f"{path} is incomplete: its conversion was interrupted. Remove it and convert again.")
    return open_stored_params(StoredParams(params_dir), hf_dir, dtype, param_dtype)


def open_stored_params(stored: StoredParams, hf_dir: str, dtype: str | None = None, param_dtype: str | None = None):
    """(config, {parameter path: (shape, dtype)}, load) for the parameters of the model that
    `hf_dir`/config.json describes, stored as `stored` says; `load(p)` reads one parameter, so a
    consumer that writes each away holds one at a time. Parameters come in `param_dtype` and the
    config computes in `dtype` (as `open_hf_params`: either alone sets both; default: the dtype
    stored). Every parameter's shape is checked against the config before any is read."""
    config, _ = read_config(hf_dir)
    leaves = stored.leaves()
    wanted = param_shapes(config)
    missing = sorted(".".join(p) for p in wanted if stored.key(p) not in leaves)
    wrong = sorted(
        f"{'.'.join(p)} {leaves[stored.key(p)][0]} (the config needs {shape})"
        for p, (shape, _) in wanted.items()
        if stored.key(p) in leaves and leaves[stored.key(p)][0] != shape
    )
    if missing or wrong:
        raise CheckpointError(
            f"{stored.directory}: the parameters do not match {hf_dir}/{CONFIG_FILE}: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), other shapes {wrong[:5]} ({len(wrong)}). "
            "Is that config.json the config of these weights?"
        )
    stored_dtype = leaves[stored.key(EMBEDDINGS)][1].name
    config = dataclasses.replace(config.with_dtypes(stored_dtype), source_dir=paths.absolute(hf_dir))
    config = config.with_precision(dtype, param_dtype)
    shapes = {p: (shape, np.dtype(config.jnp_param_dtype)) for p, (shape, _) in wanted.items()}
    on_host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])

    def load(param_path: tuple) -> np.ndarray:
        shape, dtype = leaves[stored.key(param_path)]
        try:
            value = stored.load(param_path, jax.ShapeDtypeStruct(shape, dtype, sharding=on_host))
        except (ValueError, KeyError, FileNotFoundError) as e:
            name = ".".join(param_path)
            raise CheckpointError(f"{stored.directory}: parameter {name} could not be read ({e}).") from e
        return value.astype(shapes[param_path][1])

    return config, shapes, load


def load_model(path: str, dtype: str | None = None, param_dtype: str | None = None):
    """The model stored in a checkpoint directory written by `save_params`, in the precision
    asked for (as `from_pretrained`; default: as stored)."""
    config, shapes, load = open_params(path, dtype, param_dtype)
    return model_from_params(config, ((p, load(p)) for p in shapes))
