"""glibc's heap, kept from holding on to the large transient buffers of restores and snapshots."""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # glibc only


_LIBC = _libc()
_M_MMAP_THRESHOLD = -3


def keep_large_buffers_off_the_heap(threshold_bytes: int) -> None:
    """Serve every allocation of `threshold_bytes` or more with its own mapping, returned to the OS on free.

    A restore or a snapshot holds one (tens of MB) several times over for a moment, in worker threads. By
    default glibc raises this threshold after each large free and then serves such buffers from per-thread
    heaps that it rarely gives back: a replica that restored many sessions would keep every transient copy
    (about 30 MB a session, measured). Setting it fixes it for the process.
    """
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (after a restore or a snapshot)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
