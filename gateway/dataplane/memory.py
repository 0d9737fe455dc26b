"""Giving memory back to the OS after large requests (glibc's allocator keeps freed pages).

glibc serves allocations above a dynamic threshold (which grows up to 32 MiB) from its heap and
keeps the pages after free: measured in-process, 10 rejected 30 MiB requests left RSS at 344 MB
with nothing alive; with a fixed threshold of 256 KiB every buffer that large is mapped on its
own and unmapped on free, and RSS went back to 82 MB. (What remains for a while after a burst is
gRPC's receive buffers, freed on its own threads: seconds later when the CPU is busy;
tests/test_hardening.py measures both.) A malloc_trim after large requests was tried and made no
measurable difference, so there is none.
"""

from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 * 1024


def return_large_buffers_to_os() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass
