"""One run at a time in a workdir: a lock that the run holds while it lives.

Two runs in one workdir would both write metrics and checkpoints of the same steps. The run
(process 0 of it) writes WORKDIR/lock.json, naming its process, host and start time, and
renews a heartbeat in it every HEARTBEAT_S seconds; it removes the file when it ends. A
second run finds the file and is refused with one line naming the holder, unless the holder
is gone:

* on the same host, its process no longer runs (a run killed with SIGKILL, a crashed VM
  that came back);
* anywhere (another host, a bucket), its heartbeat is older than LEASE_S.

On a disk the file appears at once with its content (written aside, then linked: creating a
link fails if the name exists), so two runs starting together cannot both take it. An
object store has no such operation here: the run writes its lease, waits, and reads it back;
of two runs that wrote within that pause, the one whose lease stayed goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid

from etils import epath

from vppo_jax.errors import InputError
from vppo_jax.io import paths

LOCK_FILE = "lock.json"
HEARTBEAT_S = 60.0
LEASE_S = 600.0  # a heartbeat older than this: the holder is gone
SETTLE_S = 2.0  # object stores: the pause between writing a lease and reading it back


class WorkdirLockedError(InputError):
    """Another live run holds the workdir."""


@dataclasses.dataclass
class Holder:
    pid: int
    host: str
    started: float
    heartbeat: float
    token: str  # tells our lease from another's that names the same process

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"process {self.pid} on {self.host}, running since {since}"

    def gone(self, now: float) -> str | None:
        """Why the holder is gone, or None when it may still run."""
        if self.host == socket.gethostname() and not _process_runs(self.pid):
            return f"process {self.pid} no longer runs"
        if now - self.heartbeat > LEASE_S:
            return f"no heartbeat for {now - self.heartbeat:.0f} s"
        return None


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class WorkdirLock:
    """`acquire()` takes the workdir or raises WorkdirLockedError; `release()` gives it back."""

    def __init__(self, workdir: str):
        self.path = os.path.join(paths.absolute(workdir), LOCK_FILE)
        now = time.time()
        self.holder = Holder(os.getpid(), socket.gethostname(), now, now, uuid.uuid4().hex)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self):
        paths.makedirs(os.path.dirname(self.path))
        for _ in range(2):  # a second try after removing a stale lock
            current = self._read()
            if current is not None:
                reason = current.gone(time.time())
                if reason is None:
                    raise WorkdirLockedError(
                        f"{os.path.dirname(self.path)} is in use by the run of {current.describe()} "
                        f"(lock file {self.path}): wait for it to end, or give this run another --workdir"
                    )
                print(f"taking over the workdir lock of {current.describe()}: {reason}", file=sys.stderr, flush=True)
                self._remove_if(current.token)
            if self._create():
                self._heartbeat = threading.Thread(target=self._beat, name="workdir-heartbeat", daemon=True)
                self._heartbeat.start()
                return
        raise WorkdirLockedError(f"another run took the workdir lock {self.path} just now: use another --workdir")

    def release(self):
        """Stops the heartbeat and removes the lock, if it is still ours."""
        if self._heartbeat is None:
            return
        self._stop.set()
        self._heartbeat.join()
        self._heartbeat = None
        self._remove_if(self.holder.token)

    def _read(self) -> Holder | None:
        try:
            return Holder(**json.loads(paths.read_text(self.path)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as error:
            raise WorkdirLockedError(
                f"the workdir lock {self.path} is unreadable ({error}): remove it if no run uses this workdir"
            ) from error

    def _create(self) -> bool:
        """Writes our lock if there is none; whether it is ours now."""
        if paths.is_local(self.path):
            aside = f"{self.path}.{self.holder.token}"
            paths.write_json(aside, dataclasses.asdict(self.holder))
            try:
                os.link(aside, self.path)  # fails if the name exists: atomic on a local disk and NFS
            except FileExistsError:
                return False
            finally:
                os.remove(aside)
            return True
        paths.write_json(self.path, dataclasses.asdict(self.holder))
        time.sleep(SETTLE_S)
        current = self._read()
        return current is not None and current.token == self.holder.token

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            self.holder.heartbeat = time.time()
            current = self._read_quietly()
            if current is None or current.token != self.holder.token:
                return  # someone removed or took it: nothing of ours to renew
            try:
                if paths.is_local(self.path):  # renewed whole, so that a reader never sees half a file
                    aside = f"{self.path}.{self.holder.token}"
                    paths.write_json(aside, dataclasses.asdict(self.holder))
                    os.replace(aside, self.path)
                else:
                    paths.write_json(self.path, dataclasses.asdict(self.holder))
            except OSError as error:  # the next beat tries again; LEASE_S leaves room for several
                print(f"could not renew the workdir lock {self.path}: {error}", file=sys.stderr, flush=True)

    def _read_quietly(self) -> Holder | None:
        try:
            return self._read()
        except (WorkdirLockedError, OSError):
            return None

    def _remove_if(self, token: str):
        current = self._read_quietly()
        if current is not None and current.token == token:
            epath.Path(self.path).unlink(missing_ok=True)
