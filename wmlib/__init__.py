"""World Models (Ha & Schmidhuber, 2018) in JAX + Equinox."""

import os as _os

import gymnasium as _gym

__version__ = "0.1.0"

# wmlib.fast.render.CarRacingFast: CarRacing-v3 with byte-identical observations, about twice as fast.
# Registered by entry point, so `import wmlib` does not load pygame and Box2D; same limits as stock.
if "wmlib/CarRacingFast-v3" not in _gym.registry:
    _stock = _gym.spec("CarRacing-v3")
    _gym.register(id="wmlib/CarRacingFast-v3", entry_point="wmlib.fast.render:CarRacingFast",
                  max_episode_steps=_stock.max_episode_steps,
                  reward_threshold=_stock.reward_threshold)


def reuse_freed_memory() -> None:
    """Keep memory freed by a jitted computation inside the process for the next call (glibc only).

    XLA's CPU runtime allocates a computation's scratch buffers afresh on every call (hundreds of MB
    for V's training step) from its worker threads. glibc hands blocks of 128 kB and more back to
    the kernel when they are freed, and each thread has its own arena, so every step touches brand-
    new pages that the kernel zero-fills one page fault at a time: ~50,000 faults per V step, about
    15% of its time on 2 cores. Serving large blocks from one heap (M_MMAP_MAX = 0, M_ARENA_MAX = 1)
    and never trimming it (M_TRIM_THRESHOLD) removes them; the price is that the process keeps the
    memory of its largest step. It must run before JAX starts its threads, so `import wmlib` does
    it; WM_MALLOC=default leaves glibc's behaviour alone. Idempotent; without glibc it does nothing.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # from glibc's malloc.h
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    libc.mallopt(M_ARENA_MAX, 1)


if _os.environ.get("WM_MALLOC", "reuse") != "default":
    reuse_freed_memory()
