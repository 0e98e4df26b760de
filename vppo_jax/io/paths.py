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

A store that cannot be used (no network, no credentials, access denied) raises InputError,
one line naming the path and the fix, from every function here. A missing object stays
FileNotFoundError. Before the first request to Cloud Storage a connection to its host is tried,
so a machine without network hears so at once rather than after gcsfs's minute of retries.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import urllib.parse
from typing import IO

import fsspec
from etils import epath

from vppo_jax.errors import InputError, one_line

COPY_CHUNK_BYTES = 16 << 20

# fsspec caches an object store's listings (and the sizes in them) for the life of a process, so
# objects another process wrote since, or rewrote, would stay unseen or read short: a trial's
# checkpoints for the sweep launcher, a resumed run's metrics. Every lookup asks the store.
for _protocol in ("gs", "s3", "az"):
    fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False
# gcsfs logs each failed request with its traceback before raising; the error reaches the
# caller as one line (naming_storage_errors), so those logs would only bury it.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


# Errors that mean what they say about the path itself, whatever the backend: not a storage failure.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, InputError)
GCS_HOST = "https://storage.googleapis.com"
CONNECT_TIMEOUT_S = 10
CREDENTIALS_FIX = (
    "give this machine credentials that can use the bucket (`gcloud auth application-default login`, or "
    "GOOGLE_APPLICATION_CREDENTIALS=KEY.json; on a TPU VM, grant the VM's service account access)"
)


@contextlib.contextmanager
def naming_storage_errors(path: str | os.PathLike):
    """Failures of an object store inside the block -> one InputError naming `path` and the fix
    (nothing changes for a local path)."""
    if is_local(path):
        yield
        return
    _check_reachable(os.fspath(path))
    try:
        yield
    except _PATH_ERRORS:
        raise
    except Exception as error:
        raise InputError(_storage_error_message(os.fspath(path), error)) from error


def _storage_errors(function):
    """`function(path, ...)` under `naming_storage_errors(path)`."""

    @functools.wraps(function)
    def wrapper(path, *args, **kwargs):
        with naming_storage_errors(path):
            return function(path, *args, **kwargs)

    return wrapper


def _storage_error_message(path: str, error: BaseException) -> str:
    """One line: the path, what failed, and what to do about it."""
    detail = one_line(error)
    status = getattr(error, "code", None)  # gcsfs's HttpError carries the HTTP status
    if isinstance(error, PermissionError) or status in (401, 403) or str(error).startswith("Forbidden"):
        return f"{path}: access denied ({detail}): {CREDENTIALS_FIX}."
    if type(error).__module__.startswith("google.auth"):
        return f"{path}: no usable credentials ({detail}): {CREDENTIALS_FIX}."
    import aiohttp  # gcsfs's HTTP client, installed with it

    if isinstance(error, (ConnectionError, TimeoutError, aiohttp.ClientConnectionError)):
        return f"{path}: the storage service cannot be reached ({detail}): check this machine's network."
    return f"{path}: the storage request failed ({detail}); check the path and this machine's access to it."


def _check_reachable(url: str):
    """Connects to Cloud Storage's host once per process (gs:// only, and not through a proxy);
    raises InputError when that fails: gcsfs would retry for a minute before saying so."""
    if not url.startswith("gs://") or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy")):
        return
    endpoint = urllib.parse.urlsplit(os.environ.get("STORAGE_EMULATOR_HOST") or GCS_HOST)
    try:
        _connect(endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80))
    except OSError as error:
        raise InputError(
            f"{url}: the storage service {endpoint.hostname} cannot be reached ({type(error).__name__}: {error}): "
            "check this machine's network, or use a local path."
        ) from None


@functools.cache  # a success is remembered; a failure raises, so the next call tries again
def _connect(host: str, port: int):
    socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()


def is_local(path: str | os.PathLike) -> bool:
    """Whether `path` is on this machine's filesystem (not a URL like gs://bucket/dir)."""
    return "://" not in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
    """An absolute local path, or the URL unchanged (a URL is absolute already)."""
    return os.path.abspath(path) if is_local(path) else os.fspath(path)


@_storage_errors
def exists(path: str | os.PathLike) -> bool:
    return epath.Path(path).exists()


@_storage_errors
def is_dir(path: str | os.PathLike) -> bool:
    """In an object store a directory is a prefix some object starts with."""
    return epath.Path(path).is_dir()


@_storage_errors
def is_file(path: str | os.PathLike) -> bool:
    return epath.Path(path).is_file()


@_storage_errors
def makedirs(path: str | os.PathLike):
    """Creates the directory and its parents (nothing to create under an object store's bucket)."""
    epath.Path(path).mkdir(parents=True, exist_ok=True)


@_storage_errors
def listdir(path: str | os.PathLike) -> list[str]:
    """The names in a directory; [] when it does not exist."""
    directory = epath.Path(path)
    return sorted(entry.name for entry in directory.iterdir()) if directory.is_dir() else []


@_storage_errors
def open_file(path: str | os.PathLike, mode: str = "r") -> IO:
    """A file object: "r"/"rb" (seekable) or "w"/"wb". Writing to an object store uploads on close."""
    return epath.Path(path).open(mode)


@_storage_errors
def read_text(path: str | os.PathLike) -> str:
    with open_file(path) as f:
        return f.read()


@_storage_errors
def write_text(path: str | os.PathLike, text: str):
    with open_file(path, "w") as f:
        f.write(text)


def read_json(path: str | os.PathLike):
    return json.loads(read_text(path))


def write_json(path: str | os.PathLike, value, indent: int | None = 2):
    write_text(path, json.dumps(value, indent=indent))


@_storage_errors
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
    with (
        naming_storage_errors(target if is_local(source) else source),
        open_file(source, "rb") as src,
        open_file(target, "wb") as dst,
    ):
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


@_storage_errors
def remove_tree(path: str | os.PathLike):
    """Removes a directory and everything under it; nothing when it does not exist."""
    epath.Path(path).rmtree(missing_ok=True)
