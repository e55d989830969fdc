"""Dream throughput: steps per second of `dream.population_returns`, C in the loop.

The paper's CMA-ES generation is 64 candidates x 16 rollouts = 1024 dreams; each step runs M's LSTM,
its heads (mixtures, reward, done), the temperature sampling of z and the linear controller. M and
the start bank are random (speed does not depend on the weights), at the paper's sizes. The time is
measured after compilation, best of `--repeat` calls.

    uv run python bench/dream_speed.py                           # 64 x 16 dreams x 1000 steps
    uv run python bench/dream_speed.py --population 8 --steps 100

Prints the settings and each call's wall and CPU time, then a JSON line {"dream_steps_per_s": ...}
(also per CPU second: on a busy machine that number moves less than the wall-clock one).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from wmlib.controller import n_params
from wmlib.dream import DreamParams, make_start_bank, population_returns
from wmlib.mdnrnn import MDNRNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="timed calls after the compiling one")
    parser.add_argument("--start", default="warm", choices=["warm", "real", "zero"])
    args = parser.parse_args()

    z_dim, hidden = 32, 256
    rng = np.random.default_rng(0)
    episodes = [rng.normal(size=(200, z_dim)).astype(np.float32) for _ in range(5)]
    bank = make_start_bank(episodes, [np.full_like(e, -2.0) for e in episodes],
                           [rng.uniform(size=(200, 3)).astype(np.float32) for _ in episodes], warmup=32)
    params = DreamParams(MDNRNN(jax.random.PRNGKey(0), z_dim=z_dim, hidden=hidden), bank,
                         tau=1.0, max_steps=args.steps, start=args.start)
    flat = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (args.population, n_params(z_dim, hidden)))
    dreams = args.population * args.repeats
    print(f"{jax.devices()[0]}: {args.population} candidates x {args.repeats} repeats = {dreams} dreams "
          f"x {args.steps} steps, start {args.start!r}", flush=True)

    t0 = time.perf_counter()
    population_returns(jax.random.PRNGKey(2), flat, params, args.repeats, args.steps).block_until_ready()
    print(f"compile + first call: {time.perf_counter() - t0:.1f} s", flush=True)
    best, best_cpu = float("inf"), float("inf")
    for i in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        population_returns(jax.random.PRNGKey(3 + i), flat, params, args.repeats, args.steps).block_until_ready()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        best, best_cpu = min(best, dt), min(best_cpu, cpu)
        print(f"call {i + 1}: {dt:.2f} s wall, {cpu:.2f} s CPU ({dreams * args.steps / dt:,.0f} steps/s)", flush=True)
    # On a shared machine the wall time depends on the neighbours; CPU seconds (all threads) less so.
    print(json.dumps({"dream_steps_per_s": round(dreams * args.steps / best), "dreams": dreams,
                      "steps": args.steps, "best_s": round(best, 3), "best_cpu_s": round(best_cpu, 3),
                      "dream_steps_per_cpu_s": round(dreams * args.steps / best_cpu),
                      "device": str(jax.devices()[0])}))


if __name__ == "__main__":
    main()
