"""Run real CarRacing episodes, many at once, on local worker processes.

Episode i of a collection with seed S runs on env seed S+i, with the policy's random generator
seeded by the same number, so any episode can be reproduced alone. Workers are separate processes
(CarRacing is single-threaded Python) started with "spawn", which is safe next to JAX's threads.
A worker drives one episode at a time (`run_episode`, any policy), or a trained agent's episodes
K at a time in lockstep (`run_agent_episodes`), so V, M and C run once per step for all K.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from wmlib.data import (Episode, EpisodeError, episode_files, episode_name, load_branches, load_episode,
                        mirror_episode, save_branches, save_episode, steering_probes, write_manifest)
from wmlib.env import make_env, offroad_steps, preprocess, track_of_seed
from wmlib.errors import SetupError, WMError
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
    patience: int | None = None  # end early after this many steps without a new tile (`out_of_patience`)


ZOOM_STEPS = 50  # CarRacing zooms in on the car during its first second (50 frames)


def out_of_patience(rewards, patience: int | None) -> bool:
    """Whether an episode with these step rewards so far should end early: its last `patience`
    steps, all after the zoom-in, found no new tile. (A step's reward is -0.1, plus 1000/N for each
    new tile of the N on the track, so reward > 0 marks a new tile.) None: never."""
    return (patience is not None and len(rewards) >= ZOOM_STEPS + patience
            and max(rewards[-patience:]) <= 0)


def default_workers() -> int:
    return os.cpu_count() or 1


class _EpisodeRecord:
    """One episode being driven: it resets `env` to the spec's seed, then `step(action)` records the
    current observation (and its preprocessed `frame`), the action, the car's position and the reward."""

    def __init__(self, spec: EpisodeSpec, env):
        self.spec, self.env = spec, env
        self.frames: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.rewards: list[float] = []
        self.car_xy: list[tuple[float, float]] = []
        self.raw: list[np.ndarray] = []
        self.terminated = self.truncated = False
        self.obs, _ = env.reset(seed=spec.seed)
        self.frame = preprocess(self.obs)

    @property
    def over(self) -> bool:
        """Ended by the env, by `max_steps`, or out of patience."""
        return (self.terminated or self.truncated or len(self.rewards) >= self.spec.max_steps
                or out_of_patience(self.rewards, self.spec.patience))

    def step(self, action: np.ndarray) -> None:
        self.frames.append(self.frame)
        if self.spec.keep_raw:
            self.raw.append(self.obs)
        self.actions.append(action)
        self.car_xy.append(tuple(self.env.unwrapped.car.hull.position))
        self.obs, reward, self.terminated, self.truncated, _ = self.env.step(action)
        self.frame = preprocess(self.obs)
        self.rewards.append(reward)

    def episode(self) -> Episode:
        info = {"car_xy": np.asarray(self.car_xy, np.float32), **({"raw": np.stack(self.raw)} if self.raw else {})}
        return Episode(frames=np.stack(self.frames), actions=np.stack(self.actions),
                       rewards=np.asarray(self.rewards, np.float32), terminated=bool(self.terminated),
                       truncated=bool(self.truncated or not self.terminated), policy=self.spec.policy,
                       seed=self.spec.seed, info=info)


def run_episode(spec: EpisodeSpec, env=None, policy=None) -> Episode:
    """Drive one episode of `spec` and return it (frames preprocessed to 64x64x3 uint8)."""
    from wmlib.policies import make_policy  # policies sit above this module's callers' imports

    env = env or make_env(fast=spec.fast)
    policy = policy or make_policy(spec.policy, **spec.policy_kwargs)
    record = _EpisodeRecord(spec, env)
    policy.reset(np.random.default_rng(spec.seed))
    while not record.over:
        record.step(np.asarray(policy.act(record.obs, env), np.float32))
    return record.episode()


def run_agent_episodes(specs: list[EpisodeSpec]) -> list[Episode]:
    """Drive the "controller" episodes of `specs` in lockstep, one environment each: every step, the
    agent's V -> M -> C runs for all the episodes still going in ONE jitted call (`agent.AgentBatch`)
    instead of one call per frame. All specs share one agent folder and z_mode; each may bring its
    own `controller_params`. Episode k equals `run_episode(specs[k])` exactly (frames, actions,
    rewards): same env seed, same z-noise key, and arithmetic per episode that the batch leaves alone.
    """
    from wmlib.agent import AgentBatch

    shared = {(s.policy, s.policy_kwargs.get("agent"), s.policy_kwargs.get("z_mode", "sample")) for s in specs}
    if len(shared) != 1 or specs[0].policy != "controller":
        raise ValueError(f"run_agent_episodes drives episodes of policy 'controller' with one agent folder and "
                         f"z_mode; got (policy, agent, z_mode) = {sorted(shared, key=str)}")
    _, folder, z_mode = shared.pop()
    if folder is None:
        raise ValueError("run_agent_episodes: the specs name no agent folder (policy_kwargs['agent'])")
    agent = AgentBatch.load(folder, [s.policy_kwargs.get("controller_params") for s in specs],
                            [np.random.default_rng(s.seed) for s in specs], z_mode)
    records = [_EpisodeRecord(s, make_env(fast=s.fast)) for s in specs]
    try:
        live = [k for k, r in enumerate(records) if not r.over]
        while live:
            actions = agent.act(np.stack([records[k].frame for k in live]), np.asarray(live))
            for k, action in zip(live, actions):
                records[k].step(action)
            live = [k for k in live if not records[k].over]
    finally:
        for r in records:
            r.env.close()
    return [r.episode() for r in records]


def split_blocks(items: list, batch: int, workers: int) -> list[list]:
    """`items` cut into consecutive blocks of at most `batch`, as even as possible, and at least one
    block per worker while there are items enough (so 8 episodes on 2 workers are 2 blocks of 4)."""
    if batch < 1:
        raise WMError(f"batch (episodes a worker drives at once) must be a positive integer, got {batch}")
    n = max(-(-len(items) // batch), min(workers, len(items)))
    return [items[i * len(items) // n:(i + 1) * len(items) // n] for i in range(n)]


def _collect_one(spec: EpisodeSpec, out: str, mirror: bool) -> dict:
    """Worker: run one episode, write it (and its mirror image) atomically, return its summary."""
    ep = run_episode(spec)
    save_episode(Path(out) / episode_name(spec.policy, spec.seed), ep)
    if mirror:
        save_episode(Path(out) / episode_name(spec.policy, spec.seed, mirrored=True), mirror_episode(ep))
    return ep.summary()


BACKENDS = ("local", "ray")
_backend = {"name": "local", "address": None}


def use_backend(name: str = "local", address: str | None = None) -> None:
    """Run episodes on local worker processes ("local") or as Ray tasks ("ray", on the cluster at
    `address`: "auto" for a running cluster, "HOST:PORT", or None to start a local Ray instance).

    Both give identical episodes and scores for the same seeds: an episode depends only on its spec.
    """
    if name not in BACKENDS:
        raise WMError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "ray":
        _connect_ray(address)
    _backend.update(name=name, address=address)


def _connect_ray(address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise SetupError("the ray backend needs Ray: install it with `uv sync --extra ray` "
                         "(or `pip install 'ray>=2.40'`)") from None
    if ray.is_initialized():
        return
    if address not in (None, "auto"):
        import socket

        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
        except (OSError, ValueError) as e:
            raise ConnectionError(f"cannot reach the Ray cluster at {address} ({e}); start it with "
                                  "`ray start --head` on that machine or check the address") from None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 num_cpus=None if address else default_workers())
    except ConnectionError as e:
        raise ConnectionError(f"cannot reach a Ray cluster at {address!r}: {e}") from None


def parallel_map(fn: Callable, items: list, workers: int, desc: str = "episodes",
                 frames_of: Callable[[Any], int] | None = None, progress: bool = True, unit: str = "ep"
                 ) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Run `fn(item)` for every item on the active backend; yield (item, result, error) as they finish.

    Local: `workers` processes. Ray: one task per item on the cluster (`workers` is ignored; Ray
    schedules by free CPUs). A failing item does not stop the others: its exception is yielded in
    place of a result. An item whose worker process died is retried once. The progress bar counts
    items (in `unit`s) and, when `frames_of(result)` is given, environment frames per second.
    """
    if workers < 1:
        raise WMError(f"workers must be a positive integer, got {workers}")
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress)
    frames, start = 0, time.perf_counter()

    def done(item, result, error):
        nonlocal frames
        if error is None and frames_of is not None:
            frames += frames_of(result)
            bar.set_postfix(frames_per_s=f"{frames / (time.perf_counter() - start):.0f}")
        bar.update()
        return item, result, error

    try:
        if _backend["name"] == "ray":
            runner = _run_ray(fn, items)
        elif workers == 1 or len(items) <= 1:
            runner = _run_inline(fn, items)
        else:
            runner = _run_processes(fn, items, workers)
        for item, result, error in runner:
            yield done(item, result, error)
    finally:
        bar.close()


def _run_inline(fn, items):
    for item in items:
        try:
            yield item, fn(item), None
        except Exception as e:  # reported with its item by the caller
            yield item, None, e


def _run_processes(fn, items, workers, retry: bool = True):
    died = []
    with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=mp.get_context("spawn")) as pool:
        pending = {pool.submit(fn, item): item for item in items}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                item, error = pending.pop(fut), fut.exception()
                if isinstance(error, BrokenProcessPool) and retry:
                    died.append(item)  # its worker process died (crash, out of memory): once more
                else:
                    yield item, None if error else fut.result(), error
    if died:
        yield from _run_processes(fn, died, workers, retry=False)


def _run_ray(fn, items):
    import ray

    task = ray.remote(num_cpus=1, max_retries=1, retry_exceptions=False)(fn)
    pending = {task.remote(item): item for item in items}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        item = pending.pop(ready[0])
        try:
            yield item, ray.get(ready[0]), None
        except Exception as e:  # a task's exception, or a worker that died twice
            yield item, None, e


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
        raise WMError(f"episodes must be a positive integer, got {episodes}")
    if max_steps < 1:
        raise WMError(f"max_steps must be a positive integer, got {max_steps}")
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
        raise RuntimeError(f"{len(failures)} episode(s) failed (the others are saved in {out}):\n"
                           + "\n".join(failures))
    return manifest


def _worker_call(args: tuple) -> dict:
    return _collect_one(*args)


# ---- branches: replay a recorded episode to step t0, then steer otherwise ------------------------------

BRANCH_SOURCES = ("recovery", "weave")  # default drivers: they stay near the road, where steering matters
BRANCH_STEERS = (-1.0, -0.6, -0.3, 0.0, 0.3, 0.6, 1.0)  # the wheel is held at one of these at a time
BRANCH_SEGMENTS = (1, 2, 4, 8)  # a varied branch holds that many steers in turn (the wheel swings, as C's does)


def branch_actions(recorded: np.ndarray, steers: Sequence[float], floor_gas: bool) -> np.ndarray:
    """A branch's actions (H, 3): the recorded ones with the steering replaced by `steers` held in turn
    (equal segments, the first ones one step longer when H does not divide), and with `floor_gas` the gas
    at 1 and no brake (how an evolved C likes to drive)."""
    taken = np.array(recorded, np.float32)
    taken[:, 0] = np.concatenate([np.full(len(part), s, np.float32)
                                  for s, part in zip(steers, np.array_split(np.arange(len(taken)), len(steers)))])
    if floor_gas:
        taken[:, 1:] = (1.0, 0.0)
    return taken


def _branch_one(source: str, points: list[tuple[int, list[float], bool]], horizon: int, out: str, fast: bool) -> dict:
    """Worker: the branches of one recorded episode. CarRacing is deterministic, so resetting to the
    episode's env seed and replaying its actions reproduces its state at step t0 (checked on the frame);
    from there the branch drives `horizon` steps of `branch_actions(recorded, steers, floor_gas)`.
    Each step's reward and whether it left the car off the road (as `Episode.offroad`) are kept.
    Branches the env ends early, or that would outlast the recording, are dropped."""
    ep = load_episode(source)
    track = track_of_seed(ep.seed)
    env: Any = make_env(fast=fast)
    kept: dict[str, list] = {"t0": [], "frames": [], "actions": [], "rewards": [], "offroad": []}
    try:
        for t0, steers, floor_gas in points:
            if t0 + horizon > len(ep):  # the recording ends before the branch would
                continue
            obs, _ = env.reset(seed=ep.seed)
            for i, a in enumerate(ep.actions[:t0 - 1]):
                # only the last replayed step's frame is looked at (and the first's: gymnasium's env checker
                # inspects an env's first step)
                env.unwrapped.skip_pixels = fast and i > 0
                env.step(a)
            env.unwrapped.skip_pixels = False
            if t0 > 0:
                obs, *_ = env.step(ep.actions[t0 - 1])
            seen, rewards, car_xy = [preprocess(obs)], [], []
            if not np.array_equal(seen[0], ep.frames[t0]):
                raise WMError(f"{source}: replaying its actions from env seed {ep.seed} gave another frame at step "
                              f"{t0} than the recorded one (recorded with another renderer or Gymnasium version?)")
            taken = branch_actions(ep.actions[t0:t0 + horizon], steers, floor_gas)
            for a in taken:
                obs, reward, terminated, _, _ = env.step(a)
                seen.append(preprocess(obs))
                rewards.append(reward)
                car_xy.append(tuple(env.unwrapped.car.hull.position))
                if terminated:
                    break
            if len(seen) == horizon + 1:
                for key, value in (("t0", t0), ("frames", np.stack(seen)), ("actions", taken), ("rewards", rewards),
                                   ("offroad", offroad_steps(np.asarray(car_xy), track))):
                    kept[key].append(value)
    finally:
        env.close()
    K = len(kept["t0"])
    save_branches(Path(out) / Path(source).name, Path(source).name, np.asarray(kept["t0"], np.int64),
                  np.asarray(kept["frames"], np.uint8).reshape(K, horizon + 1, *ep.frames.shape[1:]),
                  np.asarray(kept["actions"], np.float32).reshape(K, horizon, 3),
                  np.asarray(kept["rewards"], np.float32).reshape(K, horizon),
                  np.asarray(kept["offroad"], np.float32).reshape(K, horizon))
    return {"steps": sum(t0 + horizon for t0, *_ in points if t0 + horizon <= len(ep)), "branches": K}


def _branch_call(args: tuple) -> dict:
    return _branch_one(*args)


def collect_branches(data: str | os.PathLike, out: str | os.PathLike, per_episode: int = 3, horizon: int = 24,
                     first: int = 60, last: int = 420, seed: int = 0, workers: int | None = None, fast: bool = True,
                     probes: bool = False, varied: bool = True, drivers: Sequence[str] = BRANCH_SOURCES,
                     progress: bool = True) -> dict:
    """Branches of a collection's recorded episodes, for M's branch term (`mdnrnn.branch_loss`): the same
    real state, two futures that differ only in the steering.

    From each unmirrored episode of `drivers` (policy names; "controller": an agent's own episodes, where
    it fails) except the steering report's probes
    (`data.steering_probes`; with `probes`, from the probes alone: held-out branches for
    `fidelity.hold_response`), `per_episode` branch points t0 in [first, last) are drawn (generator
    seeded `seed`), each with its steering: `varied`, a number of segments from `BRANCH_SEGMENTS`, a
    steer from `BRANCH_STEERS` for each, and the gas floored in half of them; else one held steer, gas
    as recorded (the hold test's branches). `_branch_one` drives them. One file per source
    episode in `out` (same name), written atomically; existing files are skipped (resumable). Returns
    {"sources", "branches", "steps"}: the real steps driven, replays included.
    """
    files = [p.name for p in episode_files(data, mirrored=False) if p.name.split("_")[0] in drivers]
    held = set(steering_probes(files))
    files = sorted(held) if probes else [p for p in files if p not in held]
    if not files:
        raise WMError(f"{data} has no episodes of {', '.join(drivers)} to branch "
                      + ("(the steering report's probes are recovery episodes)" if probes else
                         f"(beyond the {len(held)} the steering report keeps)"))
    if not 0 < first < last or horizon < 1 or per_episode < 1:
        raise WMError(f"branch points must satisfy 0 < first < last and per_episode, horizon >= 1; got first={first}, "
                      f"last={last}, per_episode={per_episode}, horizon={horizon}")
    out = ensure_dir(out, "branch folder")
    rng = np.random.default_rng(seed)
    jobs = []
    for name in files:  # every episode's draw happens, done or not, so a resumed run draws the same points
        points = []
        for t0 in rng.integers(first, last, per_episode):
            steers = rng.choice(BRANCH_STEERS, int(rng.choice(BRANCH_SEGMENTS)) if varied else 1)
            points.append((int(t0), [float(x) for x in steers], bool(varied and rng.random() < 0.5)))
        if not (out / name).exists():
            jobs.append((str(Path(data) / name), points, horizon, str(out), fast))
    steps = 0
    failures = []
    for job, result, error in parallel_map(_branch_call, jobs, workers or default_workers(), desc="branches",
                                           frames_of=lambda r: r["steps"], progress=progress):
        if error is not None:
            failures.append(f"{job[0]}: {type(error).__name__}: {error}")
        else:
            steps += result["steps"]
    if failures:
        raise RuntimeError(f"{len(failures)} source episode(s) failed (the others are saved in {out}):\n"
                           + "\n".join(failures))
    branches = load_branches(out)
    return {"sources": len(branches), "branches": sum(len(b["t0"]) for b in branches.values()), "steps": steps}
