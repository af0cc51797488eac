"""Keep freed tensor memory in the process on CPU instead of handing it back to the kernel.

glibc's malloc serves every block above its mmap threshold (at most 32 MB, however it adapts)
with a fresh ``mmap`` and unmaps it on ``free``. A CNN's activations on a batch of 224 px images
are larger than that (EfficientNet-Lite0's first stage at batch 64: 100 MB), so every layer of
every batch faulted its pages in again and the kernel zeroed them: measured on a 2-core CPU, a
batch-64 forward spent as much time in the kernel as in the convolutions (7.5 s system against
7.6 s user, 2.3 million page faults over 20 s), and training more. Raising the mmap and trim
thresholds makes freed blocks reusable; the cost is that the process keeps its peak heap
(the memory a batch needs) until it exits.

Applied once per process by the embedder and by training when they run on a CPU; skipped where the
C library is not glibc, and when the user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``
(their choice wins).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Above any activation a CPU batch holds (glibc caps the mmap threshold at HEAP_MAX / 2 = 32 MB on
# 64-bit only while adapting it; a value set explicitly may be larger).
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1

_lock = threading.Lock()
_state: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when they are (now) raised."""
    global _state
    with _lock:
        if _state is not None:
            return _state
        _state = _apply()
        return _state


def _apply() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        log.debug("malloc thresholds left as the environment sets them")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # an older glibc refuses a threshold above half its heap size (32 MB): then that
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(M_MMAP_THRESHOLD, 32 << 20))
    ok = ok and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if ok:
        log.debug("malloc keeps freed blocks (mmap threshold %d, trim threshold %d)", MMAP_THRESHOLD, TRIM_THRESHOLD)
    return ok
