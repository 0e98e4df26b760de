"""A Cloud Storage bucket for the tests: gcp-storage-emulator serving the GCS JSON API on
loopback, in a process of its own, with everything kept in memory.

gs:// paths reach it along the code path of a real bucket: etils.epath -> fsspec -> gcsfs
(STORAGE_EMULATOR_HOST) for the files we write, orbax -> tensorstore's GCS driver
(TENSORSTORE_GCS_HTTP_URL, with a fixed test token) for checkpoints. Only the endpoint
differs. Subprocesses (the trainer, a sweep's trials) inherit the variables.
"""

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time

BUCKET = "vppo-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_listening(port: int, server: subprocess.Popen, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the storage emulator did not start on port {port} (exit status {server.poll()})")


@contextlib.contextmanager
def fake_bucket():
    """Yields "gs://vppo-test", served until the context ends; the environment is restored then."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, __file__, str(port)])
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        # gcsfs would ask Google's control API whether the bucket is zonal: not reachable here.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    saved = {name: os.environ.get(name) for name in env}
    try:
        _wait_until_listening(port, server)
        os.environ.update(env)
        yield f"gs://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def serve(port: int):
    """The emulator, plus the x-goog-generation header real GCS sends with a download: tensorstore
    reads it to update an object conditionally (as orbax's OCDBT store does its manifest)."""
    from gcp_storage_emulator.handlers import objects
    from gcp_storage_emulator.server import create_server

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        with contextlib.suppress(Exception):  # not found: answered 404 already
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]

    objects.download = download_with_generation
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # every "does it exist?" 404 is an ERROR
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    # tensorstore hangs up on some responses it has read enough of: not an error worth a traceback.
    server._api._httpd.handle_error = lambda request, client_address: None
    threading.Event().wait()  # serves until the test ends this process


if __name__ == "__main__":
    serve(int(sys.argv[1]))
