"""Real-environment evaluation of an agent: its score on real CarRacing-v3 episodes.

`evaluate` runs N real episodes (episode i on env seed S+i) on worker processes, each worker driving
a block of up to K episodes in lockstep with one jitted V -> M -> C call per step for all of them
(`rollouts.run_agent_episodes`, scores equal to one episode at a time), and returns mean, std and
every score. `drive_block` is the worker both it and `fitness.RealFitness` farm out. What M expected
along a saved episode, and its videos and filmstrips, are in `sim2real`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wmlib.data import episode_name, save_episode
from wmlib.errors import WMError
from wmlib.rollouts import (EpisodeSpec, default_workers, out_of_patience, parallel_map, run_agent_episodes,
                            split_blocks)


def drive_block(args: tuple) -> list[dict]:
    """Worker: a block of controller episodes driven in lockstep; saves them when asked; returns
    their summaries, each with "gave_up" (ended early for want of new tiles, `out_of_patience`)."""
    specs, save_dir = args
    summaries = []
    for spec, ep in zip(specs, run_agent_episodes(specs)):
        if save_dir:
            save_episode(Path(save_dir) / episode_name("agent", spec.seed), ep)
        summaries.append({**ep.summary(), "gave_up": not ep.terminated and out_of_patience(ep.rewards, spec.patience)})
    return summaries


def block_frames(summaries: list[dict]) -> int:
    """Real frames a block's episodes drove."""
    return sum(s["steps"] for s in summaries)


def evaluate(agent_dir: str | os.PathLike, episodes: int, seed: int = 0, workers: int | None = None,
             max_steps: int = 1000, fast: bool = True, save_dir: str | os.PathLike | None = None,
             controller_params: np.ndarray | None = None, keep_raw: bool = False, progress: bool = True,
             z_mode: str = "sample", batch: int = 16) -> dict:
    """Score the agent in `agent_dir` on `episodes` real episodes (env seeds seed..seed+episodes-1).

    Returns {"mean", "std", "episodes", "seed", "scores", "frames", "failed"} (frames: real steps
    driven in all, for the budget of the method). Each worker drives a block of up to `batch`
    episodes in lockstep; a block whose worker crashed lists each of its episodes in "failed" with
    its seed and the error, and the other blocks' scores are kept.
    With `save_dir` the episodes are saved (for videos, filmstrips and the sim2real analysis), with
    the raw 96x96 observations too when `keep_raw`. `z_mode`: what z C sees (`agent.Agent`).
    """
    from wmlib.agent import Agent, part_path

    if episodes < 1:
        raise WMError(f"the number of episodes must be a positive integer, got {episodes}")
    for part in ("V", "M") + (() if controller_params is not None else ("C",)):
        part_path(agent_dir, part)
    Agent.load(agent_dir, controller_params, z_mode)  # V, M and C must fit together: fail here, not in a worker
    kwargs = {"agent": str(agent_dir), "z_mode": z_mode}
    if controller_params is not None:
        kwargs["controller_params"] = np.asarray(controller_params, np.float32).tolist()
    workers = workers or default_workers()
    specs = [EpisodeSpec("controller", seed + i, max_steps, fast, kwargs, keep_raw) for i in range(episodes)]
    items = [(block, str(save_dir) if save_dir else None) for block in split_blocks(specs, batch, workers)]
    scores: dict[int, float] = {}
    failed, frames = [], 0
    for (block, _), result, error in parallel_map(drive_block, items, workers, desc="evaluate", unit="block",
                                                  frames_of=block_frames, progress=progress):
        if error is None:
            scores.update((r["seed"], r["return"]) for r in result)
            frames += block_frames(result)
        else:
            failed += [{"seed": spec.seed, "error": f"{type(error).__name__}: {error}"} for spec in block]
    values = [scores[s] for s in sorted(scores)]
    return {"mean": float(np.mean(values)) if values else float("nan"),
            "std": float(np.std(values)) if values else float("nan"), "episodes": episodes, "seed": seed,
            "scores": values, "frames": frames, "failed": failed}
