"""How fast can a pixel-identical CarRacing be? The floor set by pygame's own drawing.

Bit-identical observations require pygame's C drawing calls exactly as stock makes them (polygon
fills, anti-aliased edges, surface fills, the 1000x800 -> 96x96 smoothscale). This script times,
inside `wmlib/CarRacingFast-v3` steps, the time spent in those calls (each wrapped with a timer),
and the stock step with rendering replaced by a fixed frame (physics, reward, wrappers). Their sum
is the fastest any pixel-identical step can be on this machine, even with every other line of
Python free; the script prints the largest speed-up over stock that allows. Actions: uniform
random steering and gas, the same for both envs; env seeds 1, 2, 3; `--steps` steps each.

    uv run python bench/env_floor.py

Last line: JSON {"stock_ms": ..., "fast_ms": ..., "pixel_calls_ms": ..., "physics_ms": ...,
"max_speedup": ...}, milliseconds per step.
"""

from __future__ import annotations

import argparse
import json
import time
import types

import numpy as np
import pygame

import wmlib.fast.render
from wmlib.env import make_env

PIXEL_SECONDS = [0.0]


def timed(fn):
    """`fn` with its time added to PIXEL_SECONDS."""
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PIXEL_SECONDS[0] += time.perf_counter() - t
    return wrapper


class TimedSurface(pygame.Surface):
    """A surface whose fill and blit (the pixel work done through methods) are timed."""
    fill = timed(pygame.Surface.fill)
    blit = timed(pygame.Surface.blit)


def per_step(env, actions, seeds) -> float:
    """Seconds per step over one episode per seed (reset not counted)."""
    total = 0.0
    for seed in seeds:
        env.reset(seed=seed)
        t = time.perf_counter()
        for a in actions:
            env.step(a)
        total += time.perf_counter() - t
    return total / (len(actions) * len(seeds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    actions = [np.array([rng.uniform(-1, 1), rng.uniform(0, 1), 0.0], np.float32) for _ in range(args.steps)]
    seeds = [1, 2, 3]

    stock, fast = make_env(fast=False), make_env(fast=True)
    per_step(stock, actions[:50], [0]), per_step(fast, actions[:50], [0])  # warm up
    stock_s = min(per_step(stock, actions, seeds) for _ in range(2))
    fast_s = min(per_step(fast, actions, seeds) for _ in range(2))

    # The same fast steps with every pygame pixel call timed.
    wmlib.fast.render.gfxdraw = types.SimpleNamespace(aapolygon=timed(pygame.gfxdraw.aapolygon),
                                                      filled_polygon=timed(pygame.gfxdraw.filled_polygon))
    for module, name in [(pygame.draw, "polygon"), (pygame.draw, "lines"), (pygame.transform, "smoothscale"),
                         (pygame.image, "tobytes")]:
        setattr(module, name, timed(getattr(module, name)))
    fast.reset(seed=0)
    fast.step(actions[0])
    cache = fast.unwrapped._surfaces_cache
    for key in ("canvas", "flipped"):
        cache[key] = TimedSurface(cache[key].get_size(), 0, cache[key])
    PIXEL_SECONDS[0] = 0.0
    timed_s = per_step(fast, actions, seeds)
    pixel_s = PIXEL_SECONDS[0] / (len(actions) * len(seeds))

    frame = np.zeros((96, 96, 3), np.uint8)
    physics = make_env(fast=False)
    physics.unwrapped._render = lambda mode: frame  # the step without its picture
    per_step(physics, actions[:50], [0])
    physics_s = min(per_step(physics, actions, seeds) for _ in range(2))

    ms = 1e3
    print(f"stock {stock_s * ms:.3f} ms/step ({1 / stock_s:.0f} steps/s), fast {fast_s * ms:.3f} ms/step "
          f"({1 / fast_s:.0f} steps/s): {stock_s / fast_s:.2f}x")
    print(f"inside the fast step ({timed_s * ms:.3f} ms with timers): pygame pixel calls {pixel_s * ms:.3f} ms")
    print(f"physics, reward and wrappers without rendering: {physics_s * ms:.3f} ms")
    print(f"floor {(pixel_s + physics_s) * ms:.3f} ms/step: a pixel-identical step is at most "
          f"{stock_s / (pixel_s + physics_s):.2f}x stock here (3x needs {stock_s / 3 * ms:.3f} ms)")
    print(json.dumps({"stock_ms": round(stock_s * ms, 3), "fast_ms": round(fast_s * ms, 3),
                      "pixel_calls_ms": round(pixel_s * ms, 3), "physics_ms": round(physics_s * ms, 3),
                      "max_speedup": round(stock_s / (pixel_s + physics_s), 2)}))


if __name__ == "__main__":
    main()
