"""Files and directories on a local disk or in an object store, through one set of functions.

Every path the project reads or writes (workdirs, configs, metrics, evaluation and sweep
outputs, checkpoints, models, data) goes through here, so `gs://bucket/run` works wherever
`runs/run` does. The work is done by etils.epath, the path library orbax uses: a local
path reaches the operating system as before; a URL (gs://, s3://, ...) goes to its fsspec
filesystem (gcsfs for gs://, installed with the project). Paths are plain strings
throughout; `os.path.join`, `dirname` and `basename` are string operations and stay valid
for URLs on POSIX, only `absolute` must know the difference.

Object stores differ from disks in two ways the callers care about: an object cannot be
appended to (`append_text` rewrites it whole) and there is no rename (see
vppo_jax/io/atomic_dir.py for what a complete directory means there).
"""

from __future__ import annotations

import json
import os
from typing import IO

import fsspec
from etils import epath

COPY_CHUNK_BYTES = 16 << 20

# fsspec caches an object store's listings (and the sizes in them) for the life of a process, so
# objects another process wrote since, or rewrote, would stay unseen or read short: a trial's
# checkpoints for the sweep launcher, a resumed run's metrics. Every lookup asks the store.
for _protocol in ("gs", "s3", "az"):
    fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False


def is_local(path: str | os.PathLike) -> bool:
    """Whether `path` is on this machine's filesystem (not a URL like gs://bucket/dir)."""
    return "://" not in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
    """An absolute local path, or the URL unchanged (a URL is absolute already)."""
    return os.path.abspath(path) if is_local(path) else os.fspath(path)


def exists(path: str | os.PathLike) -> bool:
    return epath.Path(path).exists()


def is_dir(path: str | os.PathLike) -> bool:
    """In an object store a directory is a prefix some object starts with."""
    return epath.Path(path).is_dir()


def is_file(path: str | os.PathLike) -> bool:
    return epath.Path(path).is_file()


def makedirs(path: str | os.PathLike):
    """Creates the directory and its parents (nothing to create under an object store's bucket)."""
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
    """The names in a directory; [] when it does not exist."""
    directory = epath.Path(path)
    return sorted(entry.name for entry in directory.iterdir()) if directory.is_dir() else []


def open_file(path: str | os.PathLike, mode: str = "r") -> IO:
    """A file object: "r"/"rb" (seekable) or "w"/"wb". Writing to an object store uploads on close."""
    return epath.Path(path).open(mode)


def read_text(path: str | os.PathLike) -> str:
    with open_file(path) as f:
        return f.read()


def write_text(path: str | os.PathLike, text: str):
    with open_file(path, "w") as f:
        f.write(text)


def read_json(path: str | os.PathLike):
    return json.loads(read_text(path))


def write_json(path: str | os.PathLike, value, indent: int | None = 2):
    write_text(path, json.dumps(value, indent=indent))


def append_text(path: str | os.PathLike, text: str):
    """Appends to a local file; an object store has no append, so the object is read and
    written again whole (meant for logs of a few MB)."""
    if is_local(path):
        with open(path, "a") as f:
            f.write(text)
    else:
        write_text(path, (read_text(path) if exists(path) else "") + text)


def copy_file(source: str | os.PathLike, target: str | os.PathLike):
    """Copies one file, in chunks, between any two backends (local to bucket, bucket to local, ...)."""
    with open_file(source, "rb") as src, open_file(target, "wb") as dst:
        while chunk := src.read(COPY_CHUNK_BYTES):
            dst.write(chunk)


def copy_tree(source: str | os.PathLike, target: str | os.PathLike):
    """Copies the files under directory `source` into `target`, keeping relative paths."""
    for name in listdir(source):
        path = os.path.join(source, name)
        if is_dir(path):
            copy_tree(path, os.path.join(target, name))
        else:
            makedirs(target)
            copy_file(path, os.path.join(target, name))


def remove_tree(path: str | os.PathLike):
    """Removes a directory and everything under it; nothing when it does not exist."""
    epath.Path(path).rmtree(missing_ok=True)
