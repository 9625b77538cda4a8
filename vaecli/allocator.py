"""Process-wide CPU allocator settings: keep mid-size freed blocks for reuse, or hand free memory back.

glibc serves blocks of 32 MB and more (a 512x512x64 bf16 activation) with a fresh mmap and unmaps them on free,
so every layer page-faults and zero-fills its output again: that costs oneDNN's bf16 convs ~40% on 512x512 images.
`keep_freed_memory` keeps blocks up to 64 MB in the heap (bf16 tiny models only: with larger activations a heap
that keeps blocks fragments and peak memory grows); `release_free_memory` returns what the heap holds unused;
`huge_pages` backs torch's large tensors with 2 MB pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_MIN = (64 << 20) + 4096  # blocks up to a 512x512x64 fp32 activation stay in the heap; larger are mapped
_TRIM = 256 << 20  # free memory kept at the heap top before it is handed back
_tuned: bool | None = None
_libc = None


def _lib():
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _libc = False
    return _libc or None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap/trim thresholds once per process; True when applied (False off glibc, e.g. macOS)."""
    global _tuned
    if _tuned is None:
        _tuned = False
        libc = _lib()
        try:
            _tuned = bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MIN)
                          and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM))
        except AttributeError:  # musl and others have no mallopt
            _tuned = False
    return _tuned


def release_free_memory() -> None:
    """Hand the heap's free blocks back to the system (glibc `malloc_trim`); a no-op elsewhere.

    Between KL blocks: the freed band-sized temporaries of many threads otherwise stay mapped, and the next block's
    large tensors come on top of them (sd15's 1024x1024 decode peaked ~350 MB higher)."""
    libc = _lib()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def huge_pages() -> None:
    """Ask torch to back tensors of 2 MB and more with transparent huge pages (madvise), unless the user chose.

    torch reads THP_MEM_ALLOC_ENABLE once, at its first allocation, so this only acts when called before any tensor
    exists: the CLI calls it first thing. A fresh 256 MB activation then costs 128 page faults instead of 65536
    (taesd's fp32 1024x1024 decode faulted 2 GB of 4 KB pages per run), and bf16 runs peak lower (taef2 512x512:
    ~700 MB instead of ~1100). Kernels with THP set to `never` ignore the advice.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
