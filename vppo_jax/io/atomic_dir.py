"""Write a directory completely or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yields a temporary sibling of `path` to fill; renames it to `path` only on success.

    A crash or an exception leaves no partial output: the temporary directory is removed
    (or, after a hard kill, left under a name starting with '.' and ending in '.partial').
    """
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose a new output path or remove it first.")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent)
    try:
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
