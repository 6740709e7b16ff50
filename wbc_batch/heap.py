"""Handing the C heap's free memory back to the system, where the C library can (glibc).

Analysing images of many sizes allocates and frees tensors of many sizes, and glibc keeps what is
freed for reuse: a process's resident memory grew from about 600 MB to about 1.9 GB over 150
generated fields of random sizes, memory the analysis had freed (`benchmarks/memory_growth.py`,
README "Memory over a long run"). `release_free_memory` gives it back; the next image faults
the pages it needs in again, which makes it slower to analyse (a batch trimmed after each image
took 163 s against 125 s for 150 images). `watch` calls it when its queue has emptied after
analysing: a scanner that adds a field every few seconds empties the queue after each one, and
each is then slower to analyse, as with a trim after each image in a batch. `run` does not call
it.
"""

from __future__ import annotations

import ctypes
import sys


def release_free_memory() -> bool:
    """glibc's `malloc_trim(0)`: return the heap's free pages to the system. Returns whether it
    ran: False off Linux and with a C library without it (musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    trim(0)
    return True
