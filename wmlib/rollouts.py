"""Run real CarRacing episodes, many at once, on local worker processes.

Episode i of a collection with seed S runs on env seed S+i, with the policy's random generator
seeded by the same number, so any episode can be reproduced alone. Workers are separate processes
(CarRacing is single-threaded Python) started with "spawn", which is safe next to JAX's threads.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from wmlib.data import Episode, EpisodeError, episode_name, load_episode, mirror_episode, save_episode, write_manifest
from wmlib.env import make_env, preprocess
from wmlib.files import ensure_dir


@dataclass(frozen=True)
class EpisodeSpec:
    """Everything a worker needs to run one episode."""
    policy: str
    seed: int
    max_steps: int = 1000
    fast: bool = True
    policy_kwargs: dict = field(default_factory=dict)
    keep_raw: bool = False  # also keep the raw 96x96 observations (for videos)


def default_workers() -> int:
    return os.cpu_count() or 1


def run_episode(spec: EpisodeSpec, env=None, policy=None) -> Episode:
    """Drive one episode of `spec` and return it (frames preprocessed to 64x64x3 uint8)."""
    from wmlib.policies import make_policy  # policies sit above this module's callers' imports

    env = env or make_env(fast=spec.fast)
    policy = policy or make_policy(spec.policy, **spec.policy_kwargs)
    obs, _ = env.reset(seed=spec.seed)
    policy.reset(np.random.default_rng(spec.seed))
    frames, actions, rewards, car_xy, raw = [], [], [], [], []
    terminated = truncated = False
    for _ in range(spec.max_steps):
        action = np.asarray(policy.act(obs, env), np.float32)
        frames.append(preprocess(obs))
        if spec.keep_raw:
            raw.append(obs)
        actions.append(action)
        car_xy.append(tuple(env.unwrapped.car.hull.position))
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(reward)
        if terminated or truncated:
            break
    truncated = truncated or not terminated
    return Episode(frames=np.stack(frames), actions=np.stack(actions), rewards=np.asarray(rewards, np.float32),
                   terminated=bool(terminated), truncated=bool(truncated), policy=spec.policy, seed=spec.seed,
                   info={"car_xy": np.asarray(car_xy, np.float32), **({"raw": np.stack(raw)} if raw else {})})


def _collect_one(spec: EpisodeSpec, out: str, mirror: bool) -> dict:
    """Worker: run one episode, write it (and its mirror image) atomically, return its summary."""
    ep = run_episode(spec)
    save_episode(Path(out) / episode_name(spec.policy, spec.seed), ep)
    if mirror:
        save_episode(Path(out) / episode_name(spec.policy, spec.seed, mirrored=True), mirror_episode(ep))
    return ep.summary()


def parallel_map(fn: Callable, items: list, workers: int, desc: str = "episodes",
                 frames_of: Callable[[Any], int] | None = None, progress: bool = True
                 ) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Run `fn(item)` for every item on `workers` processes; yield (item, result, error) as they finish.

    A failing item does not stop the others: its exception is yielded in place of a result. The
    progress bar counts items and, when `frames_of(result)` is given, environment frames per second.
    """
    if workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers}")
    bar = tqdm(total=len(items), desc=desc, unit="ep", disable=not progress)
    frames, start = 0, time.perf_counter()

    def done(item, result, error):
        nonlocal frames
        if error is None and frames_of is not None:
            frames += frames_of(result)
            bar.set_postfix(frames_per_s=f"{frames / (time.perf_counter() - start):.0f}")
        bar.update()
        return item, result, error

    try:
        if workers == 1 or len(items) <= 1:
            for item in items:
                try:
                    result, error = fn(item), None
                except Exception as e:  # reported with its item by the caller
                    result, error = None, e
                yield done(item, result, error)
            return
        with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=mp.get_context("spawn")) as pool:
            pending = {pool.submit(fn, item): item for item in items}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    item = pending.pop(fut)
                    error = fut.exception()
                    yield done(item, None if error else fut.result(), error)
    finally:
        bar.close()


def _is_complete(path: Path) -> bool:
    try:
        load_episode(path)
        return True
    except EpisodeError:
        return False


def collect(policy: str, episodes: int, out: str | os.PathLike, seed: int = 0, workers: int | None = None,
            max_steps: int = 1000, mirror: bool = False, fast: bool = True, policy_kwargs: dict | None = None,
            progress: bool = True) -> dict:
    """Collect `episodes` episodes of `policy` on env seeds seed..seed+episodes-1 into `out`.

    Resumable: episodes whose files already exist and read back are skipped. Returns the manifest
    of the folder. Episodes that fail are reported by seed after the others have finished.
    """
    from wmlib.policies import make_policy

    if episodes < 1:
        raise ValueError(f"--episodes must be a positive integer, got {episodes}")
    if max_steps < 1:
        raise ValueError(f"--max-steps must be a positive integer, got {max_steps}")
    make_policy(policy, **(policy_kwargs or {}))  # fail now, in the main process, on an unknown policy
    out = ensure_dir(out, "collection folder")
    workers = workers or default_workers()
    specs = []
    for i in range(episodes):
        spec = EpisodeSpec(policy, seed + i, max_steps, fast, policy_kwargs or {})
        names = [episode_name(policy, spec.seed)] + ([episode_name(policy, spec.seed, True)] if mirror else [])
        if not all(_is_complete(out / n) for n in names):
            specs.append(spec)
    failures = []
    for spec, _, error in parallel_map(_worker_call, [(s, str(out), mirror) for s in specs], workers,
                                       desc=f"collect {policy}", frames_of=lambda r: r["steps"], progress=progress):
        if error is not None:
            failures.append(f"episode seed {spec[0].seed}: {type(error).__name__}: {error}")
    manifest = write_manifest(out)
    if failures:
        raise RuntimeError(f"{len(failures)} episode(s) failed (the others are saved in {out}):\n" + "\n".join(failures))
    return manifest


def _worker_call(args: tuple) -> dict:
    return _collect_one(*args)
