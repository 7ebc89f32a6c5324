"""Process-level settings for training on CPUs."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Stop glibc from returning large freed blocks to the OS at every free.

    By default glibc serves allocations above 32 MiB with fresh mmap()s, so a tensor that size
    (the 8192-way logits of a batch, their gradients) page-faults all its memory again at every
    step. Raising the mmap and trim thresholds keeps those pages in the process. Returns False,
    changing nothing, where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold_bytes))
