"""Steps per second of stock CarRacing-v3 and wmlib's CarRacingFast, one process, same episode.

The actions are recorded once from the heuristic driver on the stock env (on-road driving, as in
data collection), then both envs replay them from the same seed, alternating stock and fast
`--repeats` times so that a change in machine load hits both. Time is this process's CPU time
(time.process_time), i.e. steps per second per core; wall-clock rates are printed alongside.
Both envs are built by make_env (the usual TimeLimit/OrderEnforcing/checker wrappers).

    uv run python bench/env_speed.py                 # seed 0, 1000 steps, 3 repeats

The last line is JSON: {"stock_steps_per_s": ..., "fast_steps_per_s": ..., "ratio": ...}
(medians over the repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from wmlib.env import make_env
from wmlib.policies import make_policy


def record_actions(seed: int, steps: int) -> list[np.ndarray]:
    """The heuristic driver's actions for one episode on the track of `seed` (stock env)."""
    env = make_env(fast=False)
    policy = make_policy("heuristic")
    policy.reset(np.random.default_rng(seed))
    obs, _ = env.reset(seed=seed)
    actions = []
    for _ in range(steps):
        actions.append(policy.act(obs, env))
        obs, _, terminated, truncated, _ = env.step(actions[-1])
        if terminated or truncated:
            break
    env.close()
    return actions


def steps_per_second(fast: bool, seed: int, actions: list[np.ndarray]) -> tuple[float, float]:
    """(CPU-time, wall-clock) steps per second replaying `actions` from reset(seed)."""
    env = make_env(fast=fast)
    env.reset(seed=seed)
    cpu, wall = time.process_time(), time.perf_counter()
    for action in actions:
        env.step(action)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    env.close()
    return len(actions) / cpu, len(actions) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    actions = record_actions(args.seed, args.steps)
    rates = {False: [], True: []}
    for repeat in range(args.repeats):
        for fast in (False, True):
            cpu, wall = steps_per_second(fast, args.seed, actions)
            rates[fast].append(cpu)
            print(f"repeat {repeat}  {'fast ' if fast else 'stock'}  {cpu:6.1f} steps/s (CPU)  "
                  f"{wall:6.1f} steps/s (wall)  {len(actions)} steps", flush=True)
    stock, fast = statistics.median(rates[False]), statistics.median(rates[True])
    print(json.dumps({"stock_steps_per_s": round(stock, 1), "fast_steps_per_s": round(fast, 1),
                      "ratio": round(fast / stock, 2)}))


if __name__ == "__main__":
    main()
