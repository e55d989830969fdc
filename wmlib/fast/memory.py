"""Memory that XLA frees kept in the process for its next call (glibc only)."""

from __future__ import annotations

import os
import platform


def reuse_freed_memory() -> None:
    """Keep memory freed by a jitted computation inside the process for the next call (glibc only).

    XLA's CPU runtime allocates a computation's scratch buffers afresh on every call (hundreds of MB
    for V's training step) from its worker threads. glibc hands blocks of 128 kB and more back to
    the kernel when they are freed, and each thread has its own arena, so every step touches brand-
    new pages that the kernel zero-fills one page fault at a time: ~50,000 faults per V step, about
    15% of its time on 2 cores. Serving large blocks from one heap (M_MMAP_MAX = 0, M_ARENA_MAX = 1)
    and never trimming it (M_TRIM_THRESHOLD) removes them; the price is that the process keeps the
    memory of its largest step.

    It changes the allocator of the whole process, so `import wmlib` does not do it; the `wm` command
    does, first thing. It only helps when it runs before JAX's first computation: XLA's worker
    threads keep the arenas they started with (measured: a V step after JAX has run, even just to
    initialise the model, faults as often as without it), which is why the training functions do
    not call it. A script or notebook that trains for long calls it before its first JAX computation.
    WM_MALLOC=default leaves glibc's behaviour alone (in `wm` too). Idempotent; without glibc it
    does nothing.
    """
    if os.environ.get("WM_MALLOC", "reuse") == "default":
        return
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # from glibc's malloc.h
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    libc.mallopt(M_ARENA_MAX, 1)
