"""Seconds per CMA-ES generation in the dream: 64 candidates x 16 dreams x 1000 steps, C in the loop.

    uv run python bench/evolve_speed.py [--generations 3] [--popsize 64] [--repeats 16] [--steps 1000]

M is random at the paper's sizes (speed does not depend on the weights). For each optimizer (pycma,
then evosax) it runs a few generations after a compiling one and reports the mean seconds per
generation and the share spent outside the jitted fitness call (ask, tell, logging, checkpoints).
Last lines: one JSON object per optimizer.
"""

import argparse
import dataclasses
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from wmlib.config import EvolveConfig
from wmlib.controller import n_params
from wmlib.dream import DreamParams, make_start_bank, population_returns
from wmlib.evolve import evolve
from wmlib.mdnrnn import MDNRNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=3, help="timed generations after the first")
    parser.add_argument("--popsize", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    eps = [rng.normal(size=(300, 32)).astype(np.float32) for _ in range(4)]
    bank = make_start_bank(eps, [np.full_like(e, -2.0) for e in eps],
                           [rng.uniform(size=(300, 3)).astype(np.float32) for _ in eps])
    params = DreamParams(MDNRNN(jax.random.PRNGKey(0)), bank, tau=1.0, max_steps=args.steps)

    def fitness(key, x):
        return population_returns(key, jnp.asarray(x), params, args.repeats, args.steps)

    results = []
    for optimizer in ("pycma", "evosax"):
        cfg = dataclasses.replace(EvolveConfig(), popsize=args.popsize, repeats=args.repeats, episode_len=args.steps,
                                  generations=1 + args.generations, optimizer=optimizer, real_every=0)
        with tempfile.TemporaryDirectory() as out:
            records = evolve(fitness, n_params(), cfg, out, progress=False).records[1:]  # first one compiles
        wall = np.mean([r["wall_s"] for r in records])
        outside = 1 - np.mean([r["fitness_s"] for r in records]) / wall
        print(f"{optimizer}: {wall:.2f} s per generation ({args.popsize} x {args.repeats} x {args.steps} dream steps), "
              f"{outside:.1%} outside the fitness call, device {jax.devices()[0]}")
        results.append({"seconds_per_generation": round(float(wall), 3),
                        "outside_fitness_share": round(float(outside), 4),
                        "optimizer": optimizer})
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
