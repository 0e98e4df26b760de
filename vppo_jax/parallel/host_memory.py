"""Freed host memory handed back to the operating system between the phases of a step.

glibc's malloc keeps what a program frees in its heaps for later reuse, one heap per thread
that allocated (XLA's worker threads make several), and returns little of it by itself. On a
CPU the devices' buffers are host memory, so after a rollout (KV caches, logits), an update
(activations) or a compile (the compiler's working memory, larger than the program it
makes) the process would keep the largest phase's memory for good and stack the next
phase on top of it. `malloc_trim` returns the free pages of every heap; it costs a few
milliseconds, which a phase boundary of a multi-second step does not notice.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl and macOS have none
    except (OSError, AttributeError):
        return None


def release_freed_memory():
    """Returns the process's freed heap pages to the OS (glibc); elsewhere does nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
