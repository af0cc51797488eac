"""keep_freed_memory: large freed blocks are reused instead of being faulted in again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc thresholds are Linux-only")

# Allocate, touch and free a 64 MB block several times, counting the page faults of the loop.
PROBE = textwrap.dedent(
    """
    import ctypes, resource, sys
    from simsearch.embed.allocator import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "on" else False
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    def cycle():
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        cycle()
    print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    applied, faults = out.stdout.split()
    return applied == "1", int(faults)


def _glibc() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="needs glibc's mallopt")
def test_freed_blocks_are_reused_not_faulted_in_again() -> None:
    pages = (64 << 20) // 4096
    applied_off, off = _faults("off")
    applied_on, on = _faults("on")
    assert not applied_off and applied_on
    assert off >= 5 * pages * 0.9  # glibc's default: every 64 MB block is a fresh mmap
    assert on < pages  # after: the first block's pages are reused


@pytest.mark.skipif(not _glibc(), reason="needs glibc's mallopt")
def test_the_environment_wins() -> None:
    import os

    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    applied, _ = _faults("on", env)
    assert not applied


def test_applied_once_per_process() -> None:
    from simsearch.embed import allocator

    first = allocator.keep_freed_memory()
    assert allocator.keep_freed_memory() is first
