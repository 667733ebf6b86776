"""Handing freed memory back to the operating system after a long layer loop.

Decomposing hundreds of layers allocates and frees many tensors of tens of MB from several
threads; glibc keeps much of that in its heaps (measured: 0.23 GB after an SD1.5 extraction whose
LoRA is 0.16 GB). Inside ComfyUI, where the result stays cached, that is memory the next node
cannot use. ``malloc_trim(0)`` returns it; elsewhere (macOS, Windows, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return freed heap memory to the OS where the C library allows it; True if it ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 128 << 20


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """For a process that runs Rankwise alone (the command line, the benchmarks): glibc serves every
    allocation below 32 MiB from its heap and keeps up to 128 MiB free at the heap's top, so a layer's
    buffers reuse the previous layer's pages instead of being mapped and faulted in anew.

    glibc's own thresholds adapt only to freed chunks below 32 MiB, and a heap top above 2× the
    current threshold is returned at once: reading the two SDXL checkpoints and forming each ΔW took
    1.3 M page faults and 10.9 s on one thread, 44 K and 5.3 s with this (4 KiB faults cost ~1.5 µs).
    :func:`release_free_memory` still hands the heap back after each layer loop. Not used inside
    ComfyUI: the setting is process-wide and permanent. True if it was applied (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
