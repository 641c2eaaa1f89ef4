"""glibc malloc settings for CPU forward passes: reuse freed activations within a call.

A CPU forward pass allocates and frees the same few activation sizes in every layer (tokens x
hidden, tokens x heads x head_dim in fp32 for the norms, tokens x intermediate), tens of MB each.
glibc serves blocks over its mmap threshold (dynamic, at most 32 MiB) with ``mmap`` and returns
them on ``free``, and it trims freed memory at the top of its heap: every layer then faults fresh
pages in again, about 800,000 minor page faults per 16-document call of the 0.6B model in bf16
(docs/benchmarks.md). Where bf16 matrix products are fast, those faults are a large share of a
call.

:func:`reuse_freed_memory` fixes the mmap threshold at glibc's largest (32 MiB: bigger blocks
still come from ``mmap``) and stops trimming, so freed blocks are reused by the next layer.
:func:`release_freed_memory` (``malloc_trim``) hands every free page back to the system after a
call: the pages are faulted in once per call instead of once per layer, and a process's resident
memory never holds more than a call's peak, however its heap is fragmented. Keeping freed memory
without the trim is what made the heap grow without bound in an earlier experiment (mmap off).

Both are no-ops (returning ``False``) where the C library is not glibc (musl, macOS). Where a
preloaded allocator such as jemalloc has taken ``malloc`` over, glibc still accepts the settings
(so they return ``True``), but they have no effect: that allocator reuses freed memory itself.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD = 32 * 1024 * 1024
# Trim only above this much free memory at the top of the heap: in effect never during a call.
TRIM_THRESHOLD = 2**31 - 1

_lock = threading.Lock()
_applied = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    log.debug("glibc %s", version().decode())
    return libc


def reuse_freed_memory() -> bool:
    """Make glibc keep freed blocks up to 32 MiB for reuse (process-wide, applied once).

    Returns:
        whether the settings are in effect (glibc found and both ``mallopt`` calls accepted).
    """
    global _applied
    libc = _glibc()
    if libc is None:
        return False
    with _lock:
        if not _applied:
            _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            )
        return _applied


def release_freed_memory() -> bool:
    """Return the free pages of every heap to the system (``malloc_trim(0)``).

    Returns:
        whether glibc released any memory (``False`` also where there is no glibc).
    """
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
