"""A steady heap for the CLI's process: memory freed between steps stays with the process (glibc malloc only).

glibc serves blocks below its mmap threshold from the heap and gives the top of the heap back to the system
(trims it) once more than a trim threshold is free there. Both thresholds adapt as the program runs: the mmap
threshold rises to the largest mmapped block freed so far (at most 32 MiB), the trim threshold follows at twice
it. A training step frees and re-allocates its activations and gradients every step, so whether the top of
the heap is given back and faulted in again next step (a page fault per 4 KiB page, ~0.25 us each plus the
page's zeroing) depends on which small blocks happen to sit above the freed ones when they are freed. Measured
on the 10M-parameter MLP of benchmarks/overhead.py (42 MB of gradients): the bare passes took 2,048 page faults
per step, the same passes with a 20-element Python list made after each backward 11,000 (+15 ms a step, 10%),
gradcheck's 12,000. A property of the heap's history, not of the work: with the thresholds fixed as below,
each of the three takes 0 faults per step after the first.

So the CLI, which owns its process, fixes them: blocks up to 32 MiB (the most glibc's own adaptation reaches)
come from the heap, and the heap is trimmed only when over 1 GiB of its top is free. Peak memory is what the
steps need either way (the heap keeps, between steps, what the next step takes again). The Python API leaves
the caller's allocator alone, as it leaves the garbage collector alone (cli._tune_process).
"""

from __future__ import annotations

import ctypes
import platform
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc: where its adaptation stops
TRIM_THRESHOLD = 2**30


def steady_heap() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (the module docstring says why); False where the
    C library is not glibc (macOS, Windows, musl) or refuses, and nothing changes."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
