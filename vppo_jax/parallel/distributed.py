"""Multi-host runs: starting jax.distributed, and exchanging small host data between processes.

Every process runs the same command. On a Cloud TPU pod nothing else is needed (JAX finds
the workers itself); elsewhere name the coordinator and each process:

    python -m vppo_jax.train --config=... --workdir=... \
        --coordinator_address=HOST0:1234 --num_processes=2 --process_id=0    # and =1 on the other

On CPU the processes' collectives go over gloo (TCP), so two processes on one machine
(each with --xla_force_host_platform_device_count fake devices) run a real multi-host
program: tests/test_multihost.py does that.
"""

from __future__ import annotations

import glob
import pickle

import jax
import numpy as np

from vppo_jax.errors import InputError

CHUNK_BYTES = 64 << 20  # host data crosses the devices in pieces of this size per process


def initialize(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0):
    """Starts jax.distributed with these settings (the trainer's flags of the same names), or
    on its own on a TPU VM; a single process elsewhere does nothing.

    Call it before anything touches a device.
    """
    if coordinator_address:
        if not 0 <= process_id < num_processes:
            raise InputError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
        # CPU processes reach each other's devices through gloo (jax's CPU default now; explicit
        # so that a changed default cannot leave a CPU run without cross-process collectives).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif num_processes > 1:
        raise InputError("--num_processes > 1 needs --coordinator_address (host:port of process 0).")
    elif on_cloud_tpu():
        jax.distributed.initialize()  # workers, coordinator and ids from the TPU VM's metadata


def on_cloud_tpu() -> bool:
    """A TPU VM: its chips show up as /dev/accel* (v2-v4) or /dev/vfio/* (v5 and later). Not
    libtpu's environment variables: the planner sets them on machines without a TPU
    (parallel/tpu.quiet_host_probe), and its child processes inherit them."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def allgather(value) -> list:
    """[value of process 0, value of process 1, ...] for any picklable value, on every process."""
    count = jax.process_count()
    if count == 1:
        return [value]
    from jax.experimental import multihost_utils  # collectives over all processes' devices

    data = np.frombuffer(pickle.dumps(value), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(count)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    pieces = [
        np.asarray(multihost_utils.process_allgather(padded[start : start + CHUNK_BYTES]))
        for start in range(0, padded.size, CHUNK_BYTES)
    ]
    gathered = np.concatenate(pieces, axis=1)
    return [pickle.loads(gathered[i, : sizes[i]].tobytes()) for i in range(count)]


def barrier(name: str):
    """Waits until every process reaches the barrier of this name (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def interleave(per_process: list[list]) -> list:
    """Element k of process i goes to position k * n + i: with data sharded as global[i::n],
    this rebuilds the global order a single process reads."""
    longest = max((len(items) for items in per_process), default=0)
    return [items[k] for k in range(longest) for items in per_process if k < len(items)]


def shared_work(function, items: list, combine):
    """`combine([function(part) for each process's part])`: every process does its contiguous
    share of `items` and all get every result."""
    count, index = jax.process_count(), jax.process_index()
    share = -(-len(items) // count)
    return combine(allgather(function(items[index * share : (index + 1) * share])))
