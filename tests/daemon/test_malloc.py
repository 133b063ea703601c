"""
daemon._malloc: glibc's mmap threshold stays fixed, so big transient buffers go back
to the kernel when freed instead of pinning heap (the soak's RSS steps, issue 8).

Each case runs in a fresh interpreter: the setting is process-wide and the point is
what a process does *after* a big block was freed, which this test process has long
done. glibc's ``mallinfo2().hblks`` counts the blocks malloc has mmapped right now.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Frees a 16 MiB block (which raises glibc's dynamic threshold to 16 MiB), then takes
#: a 1 MiB one and prints the tuning's outcome and whether that block was mmapped.
_PROBE = """
import ctypes, ctypes.util, sys
sys.path.insert(0, sys.argv[1])
from daemon._malloc import tune_malloc
outcome = tune_malloc() if sys.argv[2] == "tune" else "untouched"

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2
libc.free(libc.malloc(16 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
print(outcome, libc.mallinfo2().hblks - before)
libc.free(block)
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")


def _probe(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    done = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), mode], env=environ,
                          capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    outcome, mapped = done.stdout.split()
    return outcome, int(mapped)


def test_a_freed_big_block_no_longer_moves_the_threshold() -> None:
    """Untuned, the 1 MiB block comes from the heap; tuned, it is mmapped (and unmapped)."""
    assert ("untouched", 0) == _probe("plain")
    assert ("set", 1) == _probe("tune")


def test_the_operators_environment_wins() -> None:
    """MALLOC_MMAP_THRESHOLD_ in the environment: left as glibc applied it."""
    assert ("environment", 0) == _probe("tune", MALLOC_MMAP_THRESHOLD_="33554432")
