"""What `evolve` maximises: the fitness of a population of flat controllers, in the dream or in reality.

A fitness is `fitness(key, solutions (P, n)) -> returns (P, repeats)`, a return per candidate and
rollout (bigger is better; `evolve` flips the sign for the optimiser, once).
  - `dream_fitness`: every candidate in M's dream (paper section 3.3), the whole population in one
    jitted call (`dream.population_returns`), dreams starting from encoded real frames
    (`dream_params`);
  - `RealFitness`: every candidate on real CarRacing-v3 episodes (the paper's original CarRacing
    setup), farmed out to worker processes; it counts the real frames it drives (`frames`), which
    `evolve` charges against `cfg.frame_budget`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from wmlib.config import TRAINING_SEED
from wmlib.evaluate import block_frames, drive_block
from wmlib.rollouts import EpisodeSpec, default_workers, parallel_map, split_blocks
from wmlib.errors import WMError


def dream_params(mdnrnn, encoded: dict, cfg, horizon: int | None = None):
    """The dream of an evolution config: starts from the encoded real frames (on-road ones and episode
    starts with `cfg.road_starts`), `horizon` steps (default `cfg.episode_len`)."""
    from wmlib.dream import DreamParams, make_start_bank, road_starts

    eps = list(encoded.values())
    bank = make_start_bank([e["mu"] for e in eps], [e["logvar"] for e in eps], [e["actions"] for e in eps],
                           start_ok=[road_starts(e["offroad"]) for e in eps] if cfg.road_starts else None)
    return DreamParams(mdnrnn, bank, tau=cfg.tau, max_steps=horizon or cfg.episode_len, start=cfg.start,
                       dropout=cfg.dream_dropout, ends=cfg.dream_ends)


def dream_fitness(mdnrnn, encoded: dict, cfg, ensemble=()):
    """CMA-ES fitness in the dream: one jitted call for the whole population. With `ensemble` (more Ms
    on the same V's latents), every M dreams the same starts and noise and each candidate is scored in
    the dream of the M that gives it the lowest mean return: a pessimistic ensemble, so C cannot profit
    from one M's mistake."""
    from wmlib.dream import population_returns

    params = [dream_params(m, encoded, cfg) for m in (mdnrnn, *ensemble)]

    def fitness(key, x):
        returns = jnp.stack([population_returns(key, jnp.asarray(x), p, cfg.repeats, cfg.episode_len)
                             for p in params])  # (M, P, repeats)
        worst = jnp.argmin(returns.mean(axis=2), axis=0)  # (P,)
        return returns[worst, jnp.arange(returns.shape[1])]

    return fitness


class RealFitness:
    """CMA-ES fitness on REAL episodes (the paper's original CarRacing setup): every candidate
    controller drives `repeats` real episodes, in blocks of up to `batch` episodes driven in
    lockstep, spread over the backend's workers.

    All candidates of a generation drive the same tracks (env seeds drawn from the generation's key:
    common random numbers, and a resumed run repeats them). With `patience` (default 100; None:
    never) an episode ends once that many steps after the zoom-in brought no new tile
    (`rollouts.out_of_patience`), and its return so far is its score: the frames a stuck or lost
    car would still drive are not spent (nor charged their -0.1 each). Evolution only: `evaluate`
    never ends a test episode early. `frames` counts the real frames the last call drove,
    `frames_saved` those it did not drive because episodes ended early (max_steps - steps of each).
    """

    def __init__(self, agent_dir: str | os.PathLike, repeats: int, max_steps: int = 1000,
                 workers: int | None = None, fast: bool = True, batch: int = 16, patience: int | None = 100):
        from wmlib.agent import part_path

        for part in ("V", "M"):
            part_path(agent_dir, part)
        if patience is not None and patience < 1:
            raise WMError(f"patience (steps without a new tile before an episode ends) must be a positive "
                          f"integer or None, got {patience}")
        self.agent_dir, self.repeats, self.max_steps = str(agent_dir), repeats, max_steps
        self.workers, self.fast, self.batch, self.patience = workers or default_workers(), fast, batch, patience
        self.frames = self.frames_saved = 0

    def seeds(self, key: jax.Array) -> list[int]:
        """The env seeds of a generation's `repeats` tracks. C trains on them: training-range seeds,
        never test or selection ones."""
        base = TRAINING_SEED + int(jax.random.randint(key, (), 0, 2**30))
        return [base + r for r in range(self.repeats)]

    def __call__(self, key: jax.Array, solutions: np.ndarray) -> np.ndarray:
        """(P, n) flat controllers -> (P, repeats) real returns."""
        seeds = self.seeds(key)
        specs = [EpisodeSpec("controller", seed, self.max_steps, self.fast,
                             {"agent": self.agent_dir, "controller_params": vec.tolist()}, patience=self.patience)
                 for vec in np.asarray(solutions, np.float32) for seed in seeds]
        items = [(block, None) for block in split_blocks(specs, self.batch, self.workers)]
        first = dict(zip(map(id, items), np.cumsum([0] + [len(block) for block, _ in items])))  # its first spec
        returns = np.zeros(len(specs))
        self.frames = self.frames_saved = 0
        for item, result, error in parallel_map(drive_block, items, self.workers, progress=False):
            i = first[id(item)]
            if error is not None:
                raise RuntimeError(f"real episodes of candidates {i // self.repeats}.."
                                   f"{(i + len(item[0]) - 1) // self.repeats} failed: {error}")
            returns[i:i + len(result)] = [r["return"] for r in result]
            self.frames += block_frames(result)
            self.frames_saved += sum(self.max_steps - r["steps"] for r in result if r["gave_up"])
        return returns.reshape(len(solutions), self.repeats)
