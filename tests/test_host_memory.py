"""Freed heap memory goes back to the OS (vppo_jax/parallel/host_memory.py), measured as the
process's resident set size from /proc."""

import ctypes

import pytest

from vppo_jax.parallel import host_memory


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="glibc only")
def test_freed_heap_returns_to_the_os():
    # 100 MiB in 4 KiB buffers (below malloc's mmap threshold: they live in the heap); every
    # 16th stays alive, so the freed ones are holes that the heap's top-end trimming cannot return.
    buffers = [ctypes.create_string_buffer(4096) for _ in range(25_600)]
    kept = buffers[::16]
    del buffers
    before = resident_mib()
    host_memory.release_freed_memory()
    assert before - resident_mib() > 50, "malloc_trim returned less than half of the 94 MiB freed"
    del kept
