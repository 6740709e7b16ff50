"""Handing the C heap's free memory back (`wbc_batch.heap`), observed in a child process, so that
this test process's own heap is left as it is."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from wbc_batch import heap

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "malloc_trim")

#: frees about 200 MB of small blocks below one that stays, so that glibc cannot give them back by
#: itself (only the top of the heap is trimmed on free), then prints the resident MB before and
#: after `release_free_memory`
PROBE = textwrap.dedent("""
    import ctypes
    from wbc_batch import heap

    def resident_mb():
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) // 1024 for l in fh if l.startswith("VmRSS:"))

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    blocks = [libc.malloc(4000) for _ in range(50_000)]
    for b in blocks:
        ctypes.memset(b, 1, 4000)
    keep = libc.malloc(4000)
    for b in blocks:
        libc.free(b)
    before = resident_mb()
    print(heap.release_free_memory(), before, resident_mb())
""")


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc_trim (Linux)")
def test_the_heaps_free_memory_goes_back_to_the_system():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=os.environ, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ran, before, after = proc.stdout.split()
    assert ran == "True" and int(before) - int(after) > 150, proc.stdout


def test_without_glibc_it_says_so(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert heap.release_free_memory() is False
