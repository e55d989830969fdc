"""Score a data-collection policy on real CarRacing-v3 tracks (default: the heuristic driver).

The heuristic driver is what puts good laps into the data, so its return is checked here on a fixed
set of tracks: env seeds FIRST..LAST, 1000 steps at most each, policy seed = env seed.

    uv run python bench/heuristic_score.py                      # heuristic, seeds 0..19
    uv run python bench/heuristic_score.py --policy recovery --seeds 0 4 --workers 2

Prints one line per seed, then a JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from wmlib.env import make_env
from wmlib.policies import POLICIES, make_policy

MAX_STEPS = 1000


def episode_return(policy_name: str, seed: int) -> tuple[int, float, int]:
    """(seed, return, steps) of one episode on the track of env seed `seed`."""
    env = make_env()
    policy = make_policy(policy_name)
    obs, _ = env.reset(seed=seed)
    policy.reset(np.random.default_rng(seed))
    total, steps = 0.0, 0
    for steps in range(1, MAX_STEPS + 1):  # noqa: B007 (read after the loop)
        obs, reward, terminated, truncated, _ = env.step(policy.act(obs, env))
        total += reward
        if terminated or truncated:
            break
    env.close()
    return seed, total, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="heuristic",
                        choices=[p for p in POLICIES if p != "controller"])
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 19], metavar=("FIRST", "LAST"),
                        help="inclusive range of env seeds")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    args = parser.parse_args()

    seeds = range(args.seeds[0], args.seeds[1] + 1)
    start = time.perf_counter()
    returns = []
    # spawn, not fork: a worker forked from a process where JAX runs may deadlock
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for seed, ret, steps in pool.map(episode_return, [args.policy] * len(seeds), seeds):
            print(f"seed {seed:3d}  return {ret:7.1f}  steps {steps:4d}", flush=True)
            returns.append(ret)
    returns = np.array(returns)
    print(json.dumps({"policy": args.policy, "mean": round(float(returns.mean()), 1),
                      "std": round(float(returns.std()), 1), "min": round(float(returns.min()), 1),
                      "seeds": list(args.seeds), "episodes": len(seeds),
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
