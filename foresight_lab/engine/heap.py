"""The C heap that XLA's buffers come from: handing freed memory back to the OS.

XLA on CPU allocates its arrays and each call's temporaries with malloc. glibc keeps
what is freed for reuse, resident, in the arena of the thread that allocated it; these
functions make it give the memory back. Where the C library is not glibc they do nothing.
"""

from __future__ import annotations

import ctypes


def unmap_large_buffers_when_freed(threshold_bytes: int = 16 << 20) -> bool:
    """Has glibc map every allocation of at least `threshold_bytes` on its own and unmap
    it when freed, for the whole process; False where the C library is not glibc.

    XLA allocates each call's temporaries as one buffer (21.5 MB for a 512-token prefill
    chunk of SmolLM2), on whichever of its threads runs the call. Left to itself, glibc
    raises its mapping threshold to the largest mapped block freed so far; from then on
    such a buffer comes from the running thread's own arena and stays resident there
    after it is freed, a copy a thread. A fixed threshold costs the page faults of
    mapping each one afresh (about 12 ms for 32 MB on the machine of
    docs/performance.md, against 800 ms for the prefill). The trim threshold is set to
    twice it, as glibc's own rule would. The server's process calls this at start.
    """
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    # mallopt's parameters (malloc.h); it returns 1 on success.
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(
        mallopt(m_mmap_threshold, threshold_bytes)
        and mallopt(m_trim_threshold, 2 * threshold_bytes)
    )


def return_freed_memory() -> None:
    """Hands the pages of every arena's free blocks back to the OS (`malloc_trim`).

    After a warm-up that is the heap compilation used, about 90 MB with SmolLM2's
    shapes; after requests, the temporaries of calls smaller than the mapping threshold
    (15 to 20 MB across the benchmark's workloads). It takes 4 to 25 ms on the machine of
    docs/performance.md, so the engine calls it when it falls idle, not between steps."""
    malloc_trim = _glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def _glibc_function(name: str):
    """The C library's function `name`, or None where it has none (it is not glibc)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
