"""TPU devices without a TPU: a topology's devices, from libtpu's compiler, for compiling only.

    devices = tpu.topology_devices("v5p-32")   # 16 TpuDevices (one per chip), or None without libtpu
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    jax.jit(f, in_shardings=...).lower(*abstract_args).compile()   # the TPU compiler's program

Cloud TPU names count TensorCores where a chip has two (v4, v5p: v5p-32 is 16 chips, JAX
sees one device per chip) and chips where it has one (v5e, v6e: v6e-16 is 16 chips). The
chips are laid out as the smallest slices of Cloud TPU are (`chip_grid`).

libtpu probes the machine before it makes a topology: without a TPU, and without
TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES, it logs an error per process (the probe
reads the unset values as host names), and a second process that loads it fails on its
lock file. `topology_devices` sets placeholder values and ALLOW_MULTIPLE_LIBTPU_LOAD first,
only on a machine with no TPU chip and only where they are unset: they describe no real
slice, and the compile-only topology is the one named. On a TPU VM nothing is set.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os

# Chip generation -> (TensorCores per chip as the slice name counts them, grid dimensions).
GENERATIONS = {"v4": (2, 3), "v5p": (2, 3), "v5e": (1, 2), "v6e": (1, 2)}
# What libtpu calls them in a topology name.
LIBTPU_NAMES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}


def libtpu_version() -> str | None:
    """The installed libtpu's version, or None when it cannot be imported."""
    if importlib.util.find_spec("libtpu") is None:
        return None
    return importlib.metadata.version("libtpu")


def parse_slice(name: str) -> tuple[str, int] | None:
    """("v5p", chips) of a Cloud TPU slice name such as v5p-32 or v6e-16; None for other names."""
    generation, _, count = name.partition("-")
    if generation not in GENERATIONS or not count.isdigit():
        return None
    cores_per_chip, _ = GENERATIONS[generation]
    cores = int(count)
    if cores % cores_per_chip or cores // cores_per_chip < 1:
        return None
    return generation, cores // cores_per_chip


def chip_grid(generation: str, chips: int) -> tuple[int, ...]:
    """The chips as a slice of that size lays them out: 3-D tori of 2 x 2 x 1 chips and up
    (v4, v5p), 2-D meshes (v5e, v6e); growing by doubling the last of the shortest
    dimensions: 16 v5p chips are 2 x 2 x 4, 32 are 2 x 4 x 4; 16 v6e chips 4 x 4, 32 4 x 8."""
    _, dims = GENERATIONS[generation]
    smallest = (2, 2, 1) if dims == 3 else (1, 1)
    grid = list(smallest)
    if chips < math.prod(grid) or chips & (chips - 1):
        raise ValueError(
            f"{chips} {generation} chips: a slice has a power of two, at least {math.prod(grid)} "
            f"({generation}-{math.prod(grid) * GENERATIONS[generation][0]})."
        )
    while math.prod(grid) < chips:
        shortest = min(grid)
        grid[max(i for i, n in enumerate(grid) if n == shortest)] *= 2
    return tuple(grid)


def quiet_host_probe():
    """Placeholders for the values libtpu's host probe reads, on a machine with no TPU chip
    (nothing on a TPU VM). Any entry point may call it before JAX starts its backends: JAX
    then loads libtpu without its error lines and runs on the CPU."""
    from jax._src import hardware_utils

    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        return  # a TPU VM: the probe finds the real slice
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask
    # libtpu holds a lock file (/tmp/libtpu_lockfile) so that one process owns the chips; with
    # no chip to own, other compiling processes (a test beside a planner) need not wait.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(name: str) -> list | None:
    """The compile-only devices of a Cloud TPU slice (one per chip), or None when libtpu is
    not installed. Raises ValueError for a name that is not a TPU slice libtpu can make."""
    parsed = parse_slice(name)
    if parsed is None:
        raise ValueError(f"{name!r} is not a TPU slice name (v4-N, v5p-N, v5e-N, v6e-N).")
    if libtpu_version() is None:
        return None
    generation, chips = parsed
    grid = "x".join(str(n) for n in chip_grid(generation, chips))
    quiet_host_probe()
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name=f"{LIBTPU_NAMES[generation]}:{grid}", platform="tpu").devices
    if len(devices) != chips:
        raise RuntimeError(f"libtpu made {len(devices)} devices for {name} ({grid}), expected {chips}.")
    return list(devices)
