"""Write a directory completely or not at all, on a local disk or in an object store.

On a local disk (or a mounted one) the directory is filled under a hidden temporary
sibling and renamed into place: it appears complete or not at all.

An object store (gs://, s3://) has no rename: "renaming" copies every object, which for a
checkpoint of tens of GB doubles the writing and is not atomic either. There the files are
written at their final place and a marker object, COMPLETE_MARKER, is written last, as
orbax marks its checkpoints in a bucket (commit_success.txt). `is_complete` is what readers
ask: a directory in an object store without the marker is an interrupted write. A failed
write removes what it wrote; a killed one leaves the directory without its marker, and the
next write to that path is refused until it is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from vppo_jax.io import paths

COMPLETE_MARKER = ".complete"


def is_complete(path: str) -> bool:
    """Whether `path` is a directory `atomic_directory` finished (any existing local directory:
    a local one only ever appears complete)."""
    if paths.is_local(path):
        return os.path.isdir(path)
    return paths.exists(os.path.join(path, COMPLETE_MARKER))


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yields the directory to fill: a temporary local sibling renamed to `path` on success, or
    `path` itself in an object store, marked complete on success. An existing `path` is never
    overwritten; on an exception nothing is left behind."""
    path = paths.absolute(path)
    if paths.exists(path):
        incomplete = "" if is_complete(path) else " (without its completion marker: an interrupted write)"
        raise FileExistsError(f"{path} already exists{incomplete}; choose a new output path or remove it first.")
    write = _renamed_into_place if paths.is_local(path) else _marked_when_done
    with write(path) as directory:
        yield directory


@contextlib.contextmanager
def _renamed_into_place(path: str):
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent)
    try:
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _marked_when_done(path: str):
    try:
        yield path
        paths.write_text(os.path.join(path, COMPLETE_MARKER), "")
    except BaseException:
        paths.remove_tree(path)
        raise
