"""The C library's allocator: handing freed memory back to the operating system after a long
layer loop, keeping it for reuse in a process that runs Rankwise alone, and huge pages for big
buffers. Every libc function is looked up once, here (:func:`_libc_function`).

Decomposing hundreds of layers allocates and frees many tensors of tens of MB from several
threads; glibc keeps much of that in its heaps (measured: 0.23 GB after an SD1.5 extraction whose
LoRA is 0.16 GB). Inside ComfyUI, where the result stays cached, that is memory the next node
cannot use. ``malloc_trim(0)`` returns it; elsewhere (macOS, Windows, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch


@functools.lru_cache(maxsize=None)
def _libc_function(name: str, *argtypes):
    """The C library's ``name`` (returning int) on Linux, or None where it is not found."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def _malloc_trim():
    return _libc_function("malloc_trim", ctypes.c_size_t)


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
    mallopt = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# glibc maps every allocation above 32 MiB freshly (its largest mmap threshold), so each such
# fp32 ΔW is faulted in 4 KiB pages: measured 19 ms to fill a 10240 × 1280 buffer, 4.5 ms with
# transparent huge pages. Smaller buffers come from the reused heap and are left alone.
HUGE_PAGE_MIN_BYTES = 32 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>


def empty_cpu(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.empty`` on the CPU; a buffer of ≥ :data:`HUGE_PAGE_MIN_BYTES` is advised to use
    transparent huge pages before it is first touched (Linux; a no-op where THP is off, and with
    ``RANKWISE_NO_HUGEPAGES=1``). Only the advice differs: contents and lifetime are torch's."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes >= HUGE_PAGE_MIN_BYTES:
        fn = None if os.environ.get("RANKWISE_NO_HUGEPAGES") else \
            _libc_function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if fn is not None:
            addr = t.data_ptr()
            start = -(-addr // _HUGE_PAGE) * _HUGE_PAGE
            end = (addr + nbytes) // _HUGE_PAGE * _HUGE_PAGE
            if end > start:
                fn(start, end - start, _MADV_HUGEPAGE)  # advice only: a failure changes nothing
    return t
