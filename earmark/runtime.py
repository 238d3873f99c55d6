"""Process-level CPU settings for running the encoders (applied by the CLI and the benchmarks).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves blocks above its mmap
threshold (128 KiB, raised only as far as the largest block freed) with fresh ``mmap`` pages and
hands freed heap tops back to the OS; every reuse then page-faults its memory in again. An encoder
forward allocates and frees tensors of a few MB hundreds of times, so on a CPU it spends up to half
its time in page faults (the Mamba encoder more than the AST). :func:`keep_freed_memory` raises
both thresholds, so freed blocks stay in the heap and are reused warm - the caching behaviour
PyTorch's GPU allocator has by default.

It changes how the whole process allocates, so a library import never calls it; applications
(the ``earmark`` CLI, ``benchmarks/``) do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 << 20  # older glibc caps it at 32 MiB; then that is used
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Ask glibc to serve blocks up to ``mmap_threshold`` bytes from the heap and to keep up to
    ``trim_threshold`` freed bytes instead of returning them to the OS. Returns whether it took
    effect (False off glibc, e.g. macOS or musl: nothing is changed there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, 2**31 - 1)) == 1
    ok = ok or mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, 32 << 20)) == 1
    return mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)) == 1 and ok
