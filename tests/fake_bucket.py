"""A Cloud Storage bucket for the tests: gcp-storage-emulator serving the GCS JSON API on
loopback, from a thread of this process, with everything kept in memory.

gs:// paths reach it along the code path of a real bucket: etils.epath -> fsspec -> gcsfs
(STORAGE_EMULATOR_HOST) for the files we write, orbax -> tensorstore's GCS driver
(TENSORSTORE_GCS_HTTP_URL, with a fixed test token) for checkpoints. Only the endpoint
differs. Subprocesses (the trainer, a sweep's trials) inherit the variables.
"""

import contextlib
import logging
import os
import socket

from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.server import create_server

BUCKET = "vppo-test"


def _download_with_generation(request, response, storage, *args, **kwargs):
    """The emulator's download, plus the x-goog-generation header real GCS sends: tensorstore reads
    it to update an object conditionally (as orbax's OCDBT store does its manifest)."""
    _emulator_download(request, response, storage, *args, **kwargs)
    try:
        response["x-goog-generation"] = storage.get_file_obj(
            request.params["bucket_name"], request.params["object_id"]
        )["generation"]
    except Exception:  # not found: the emulator has answered 404 already
        pass


_emulator_download = objects.download
objects.download = _download_with_generation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fake_bucket():
    """Yields "gs://vppo-test", served until the context ends; the environment is restored then."""
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # every "does it exist?" 404 is an ERROR
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        # gcsfs would ask Google's control API whether the bucket is zonal: not reachable here.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    server.start()
    # tensorstore hangs up on some responses it has read enough of: not an error worth a traceback.
    server._api._httpd.handle_error = lambda request, client_address: None
    try:
        yield f"gs://{BUCKET}"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
