"""Streaming safetensors: read and write one tensor at a time, without torch.

The format is an 8-byte little-endian header length, a JSON header mapping each name to
{dtype, shape, data_offsets}, then the raw bytes. Reading a tensor is one seek and one
read, so converting a checkpoint never holds more than the tensors being converted; the
`safetensors` package would need a whole shard in memory to write it. Files may be local or
in a bucket (vppo_jax/io/paths.py): a read is then a ranged download.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from vppo_jax.io import paths

DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint on disk is malformed; the message names the file or keys involved."""


def read_header(path: str) -> tuple[dict, int]:
    """The header of one .safetensors file and the offset where its data starts."""
    try:
        with paths.open_file(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}).") from e
    header.pop("__metadata__", None)
    return header, 8 + length


class SafetensorsDirectory:
    """All tensors of an HF model directory: a single file or shards listed by an index."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, INDEX_FILE)
        if paths.exists(index_path):
            weight_map = paths.read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path} has no 'weight_map'.")
            files = sorted(set(weight_map.values()))
        elif paths.exists(os.path.join(directory, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise CheckpointError(
                f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}: not a safetensors checkpoint "
                "(convert .bin checkpoints with transformers first)."
            )
        missing = [name for name in files if not paths.exists(os.path.join(directory, name))]
        if missing:
            raise CheckpointError(f"{directory}: shard file(s) {missing} listed in {INDEX_FILE} are missing.")
        self.entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(directory, name)
            header, data_start = read_header(path)
            for key, info in header.items():
                self.entries[key] = (path, info, data_start)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key][1]["shape"])

    def dtype_name(self, key: str) -> str:
        return self.entries[key][1]["dtype"]

    def read(self, key: str) -> np.ndarray:
        path, info, data_start = self.entries[key]
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"tensor {key!r} in {path} has unsupported dtype {info['dtype']}.")
        dtype = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - begin != count * dtype.itemsize:
            raise CheckpointError(f"tensor {key!r} in {path}: {end - begin} bytes do not fit shape {info['shape']}.")
        data = np.empty(end - begin, np.uint8)
        with paths.open_file(path, "rb") as f:
            f.seek(data_start + begin)
            filled = f.readinto(data)
        if filled != end - begin:
            raise CheckpointError(f"tensor {key!r} in {path} is truncated: the file ends early.")
        return data.view(dtype).reshape(info["shape"])


def write_file(path: str, specs: list[tuple[str, tuple[int, ...], np.dtype]], produce: Callable[[str], np.ndarray]):
    """Writes one safetensors file; `produce(name)` is called once per tensor, in order."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
    with paths.open_file(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            array = np.ascontiguousarray(produce(name))
            if array.shape != tuple(shape) or array.dtype != dtype:
                raise ValueError(f"{name}: produced {array.shape} {array.dtype}, declared {shape} {dtype}.")
            f.write(array.reshape(-1).view(np.uint8))


def write_sharded(
    directory: str,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    max_shard_bytes: int,
) -> list[str]:
    """Writes tensors as HF does: one model.safetensors, or shards plus an index when larger."""
    specs = list(specs)
    shards: list[list] = [[]]
    shard_bytes = 0
    for spec in specs:
        size = int(np.prod(spec[1], dtype=np.int64)) * spec[2].itemsize
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(spec)
        shard_bytes += size
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_file(os.path.join(directory, name), shard, produce)
    if len(shards) > 1:
        total = sum(int(np.prod(s[1], dtype=np.int64)) * s[2].itemsize for s in specs)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {spec[0]: name for name, shard in zip(names, shards) for spec in shard},
        }
        paths.write_json(os.path.join(directory, INDEX_FILE), index)
    return names
