"""Process-wide glibc malloc settings for training on CPU (docs/performance.md, Allocator).

glibc serves every block above its mmap threshold (at most 32 MB) with a fresh mmap and
unmaps it on free, so each large activation of a training step is page-faulted in anew, step
after step: on the 2-core machine that costs about a tenth of a cpu-small step. Keeping freed
memory in the heap lets the next step reuse it, as a caching allocator does on a GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and never shrink it (mallopt M_MMAP_MAX = 0 and an
    unbounded M_TRIM_THRESHOLD); True where this is glibc and the settings took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
