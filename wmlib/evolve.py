"""CMA-ES for the controller (paper section 3.3): ask, score every candidate, tell, repeat.

Sign convention, stated once: pycma and evosax both MINIMISE; we MAXIMISE the return. `_loss` is the
only place where the sign flips (loss = -mean return); everything we log and save is a return.

Fitness is any function `fitness(key, solutions (P, n)) -> returns (P, repeats)`; in the dream it is
one jitted call (`fitness.dream_fitness`), for the real environment it farms episodes out to workers
(`fitness.RealFitness`). Each generation is checkpointed so `evolve` resumes exactly where it stopped:
  - evosax: the ES state is a pytree of arrays, saved as .npz;
  - pycma: its state is a large Python object whose only complete serialisation is a pickle (which
    executes code on load). We store instead what determines it: the seed, the start point and every
    generation's fitness values. pycma's sampling draws from our own seeded generator, so a resumed
    run rebuilds the exact state by replaying ask/tell with the stored fitness, then continues.
Files in the run folder: es_state.npz, metrics.jsonl (stage "evolve"),
history.npz: every generation's search mean and its best candidates with their returns (`history`),
from which a controller is chosen by real episodes and the dream's fidelity is measured. `evolve`
knows only flat parameter vectors: the caller keeps the best one, e.g. as controller.eqx with
`on_best=controller_saver(...)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from wmlib.config import EvolveConfig
from wmlib.controller import from_flat, save_controller
from wmlib.files import append_jsonl, atomic_write, read_jsonl, write_json
from wmlib.paths import METRICS
from wmlib.errors import WMError

OPTIMIZERS = ("pycma", "evosax")
STATE_FILE = "es_state.npz"
CONFIG_FILE = "evolve_config.json"
EXTENDABLE = ("generations", "frame_budget")  # settings a resumed run may change
HISTORY_FILE = "history.npz"
HISTORY_TOP = 4  # best candidates kept per generation


def _loss(returns: np.ndarray) -> np.ndarray:
    """The one sign flip: both optimisers minimise, we maximise the mean return."""
    return -np.asarray(returns, np.float64)


class PycmaES:
    """pycma's CMA-ES with its random draws taken from a seeded numpy generator."""

    def __init__(self, x0: np.ndarray, sigma0: float, popsize: int, seed: int):
        import cma

        self._rng = np.random.default_rng(seed)
        self.es = cma.CMAEvolutionStrategy(
            np.asarray(x0, np.float64), sigma0,
            {"popsize": popsize, "seed": seed + 1, "verbose": -9,
             "randn": lambda *shape: self._rng.standard_normal(shape),
             # pycma mirrors samples when popsize < 6, and with equal fitness values its bookkeeping
             # of mirrored directions breaks ("unused injected direction"): off (so popsize >= 3).
             "CMA_mirrors": 0})
        self.history: list[np.ndarray] = []  # losses told, one (P,) array per generation

    def ask(self, key: jax.Array | None) -> np.ndarray:
        return np.asarray(self.es.ask(), np.float64)

    def tell(self, key: jax.Array | None, solutions: np.ndarray, losses: np.ndarray) -> None:
        self.es.tell(list(solutions), list(losses))
        self.history.append(np.asarray(losses, np.float64))

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.es.mean)

    def state_arrays(self) -> dict:
        return {"losses": np.stack(self.history) if self.history else np.zeros((0, 0))}

    def restore(self, arrays: dict, keys: Callable[[int], jax.Array]) -> None:
        for g, losses in enumerate(arrays["losses"]):
            self.tell(keys(g), self.ask(keys(g)), losses)


class EvosaxES:
    """evosax's CMA-ES: all JAX, its state a pytree of arrays."""

    def __init__(self, x0: np.ndarray, sigma0: float, popsize: int, seed: int):
        from evosax.algorithms import CMA_ES

        mean0 = jnp.asarray(x0, jnp.float32)
        self.es = CMA_ES(population_size=popsize, solution=mean0)
        self.params = self.es.default_params.replace(std_init=jnp.asarray(sigma0, jnp.float32))
        self.state = self.es.init(jax.random.PRNGKey(seed), mean0, self.params)

    def ask(self, key: jax.Array) -> np.ndarray:
        x, self.state = self.es.ask(key, self.state, self.params)
        return np.asarray(x)

    def tell(self, key: jax.Array, solutions: np.ndarray, losses: np.ndarray) -> None:
        self.state, _ = self.es.tell(key, jnp.asarray(solutions), jnp.asarray(losses, jnp.float32),
                                     self.state, self.params)

    @property
    def sigma(self) -> float:
        return float(self.state.std)

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.state.mean)

    def state_arrays(self) -> dict:
        return {f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(self.state))}

    def restore(self, arrays: dict, keys: Callable[[int], jax.Array]) -> None:
        leaves, treedef = jax.tree_util.tree_flatten(self.state)
        self.state = jax.tree_util.tree_unflatten(
            treedef, [jnp.asarray(arrays[f"leaf_{i}"], dtype=jnp.asarray(x).dtype) for i, x in enumerate(leaves)])


def make_optimizer(name: str, x0: np.ndarray, sigma0: float, popsize: int, seed: int):
    if name not in OPTIMIZERS:
        raise WMError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if popsize < 2 or (name == "pycma" and popsize < 3):
        raise WMError(f"population size must be at least {3 if name == 'pycma' else 2} for {name}, "
                      f"got {popsize}")
    return (PycmaES if name == "pycma" else EvosaxES)(x0, sigma0, popsize, seed)


def cma_trace(f: Callable[[np.ndarray], float], x0, sigma0: float = 0.5, popsize: int = 8,
              generations: int = 30, seed: int = 0) -> list[dict]:
    """pycma on a small function `f` (to MINIMISE, like pycma), recording each generation's search
    distribution N(mean, sigma^2 C) and its samples: for pictures of how CMA-ES moves and stretches."""
    es = PycmaES(np.asarray(x0, np.float64), sigma0, popsize, seed)
    trace = []
    for _ in range(generations):
        x = es.ask(None)
        fx = np.array([f(xi) for xi in x])
        trace.append({"mean": es.mean.copy(), "cov": es.sigma**2 * np.asarray(es.es.C), "samples": x, "f": fx})
        es.tell(None, x, fx)
    return trace


def history(run_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """An evolution run's history: mean (G, n), the search mean after each generation's update; top
    (G, k, n) and top_return (G, k), each generation's k best candidates and their mean returns."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a finished or resumable evolution run")
    with np.load(path) as z:
        return {k: z[k] for k in ("mean", "top", "top_return")}


@dataclass
class EvolveResult:
    best_params: np.ndarray     # flat controller parameters with the best mean return seen
    best_return: float
    generations: int
    records: list[dict]


def controller_saver(path: str | os.PathLike, z_dim: int = 32, hidden: int = 256,
                     **extra) -> Callable[[np.ndarray, float], None]:
    """An `on_best` for `evolve`: each new best flat vector is written to `path` as a controller for a V
    with `z_dim` and an M with `hidden`, its mean return ("dream_return") and `extra` in the header."""
    def save(params: np.ndarray, best_return: float) -> None:
        save_controller(path, from_flat(jnp.asarray(params, jnp.float32), z_dim, hidden),
                        extra={**extra, "dream_return": best_return})
    return save


def evolve(fitness: Callable[[jax.Array, np.ndarray], np.ndarray], n_params: int, cfg: EvolveConfig,
           run_dir: str | os.PathLike, x0: np.ndarray | None = None,
           on_best: Callable[[np.ndarray, float], None] | None = None,
           real_score: Callable[[np.ndarray], dict] | None = None, stage: str = "evolve",
           progress: bool = True, free: np.ndarray | None = None, world: str | None = None) -> EvolveResult:
    """Run CMA-ES for `cfg.generations` generations (resuming from `run_dir` when it holds a state).

    `fitness(key, solutions)` returns (P, repeats) returns. Whenever a generation's best candidate beats
    the best so far, `on_best(flat_params, mean_return)` is called (to save it: `controller_saver`).
    Every `cfg.real_every` generations the best candidate is also scored by
    `real_score(flat_params) -> {"mean": ..., "std": ...}` (real episodes), logged beside its dream score.
    A fitness that counts real frames (`fitness.frames`) stops the run once `cfg.frame_budget` (> 0)
    frames are used. The first start writes RUN_DIR/evolve_config.json; a resume with other settings
    (more generations or frames aside) refuses and names the difference.
    `free` (bool, `n_params` long; default all) names the entries the optimiser searches; the others
    stay at their value in `x0` (`controller.free_params`: C on z alone). Everything `evolve` hands
    out (fitness, history, `on_best`, the result) is the full vector. `world` names what `fitness` scores in
    (e.g. the digest of the M that dreams): a resume in another world refuses like other settings.
    """
    if cfg.tau < 0:
        raise WMError(f"temperature tau must be >= 0, got {cfg.tau}")
    if cfg.frame_budget < 0:
        raise WMError(f"the frame budget must be positive (or 0 for none), got {cfg.frame_budget}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    x0 = np.zeros(n_params) if x0 is None else np.asarray(x0, np.float64)
    free = np.ones(n_params, bool) if free is None else np.asarray(free, bool)
    if free.shape != (n_params,) or not free.any():
        raise WMError(f"free must mark some of the {n_params} parameters, got shape {free.shape}")

    def full(x: np.ndarray) -> np.ndarray:
        """Searched entries -> full vectors (the fixed ones from x0)."""
        out = np.broadcast_to(x0, (*x.shape[:-1], n_params)).copy()
        out[..., free] = x
        return out

    es = make_optimizer(cfg.optimizer, x0[free], cfg.sigma0, cfg.popsize, cfg.seed)  # checks the settings first
    as_json = lambda d: json.loads(json.dumps(d))  # noqa: E731  (as stored: tuples become lists)
    settings = as_json({**dataclasses.asdict(cfg), "x0_sha256": hashlib.sha256(x0.tobytes()).hexdigest()[:16],
                        **({"world": world} if world else {})})
    if (run_dir / CONFIG_FILE).exists():
        before = json.loads((run_dir / CONFIG_FILE).read_text())
        # a setting added since: its default (a world not recorded: unknown, taken as this one)
        before = {**as_json(dataclasses.asdict(EvolveConfig())), **({"world": world} if world else {}), **before}
        changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in settings.items()
                   if k not in EXTENDABLE and before.get(k) != v]
        if changed:
            raise WMError(f"{run_dir} holds an evolution with other settings ({'; '.join(changed)}); "
                          "resume with the same settings or use a new folder")
    write_json(run_dir / CONFIG_FILE, settings)
    metrics_path, state_path = run_dir / METRICS, run_dir / STATE_FILE
    base_key = jax.random.PRNGKey(cfg.seed)

    def keys(g: int) -> jax.Array:
        return jax.random.fold_in(base_key, g)

    start, best_params, best_return = 0, x0, -math.inf
    hist: dict[str, list] = {"mean": [], "top": [], "top_return": []}
    if (run_dir / HISTORY_FILE).exists() and state_path.exists():
        hist = {k: list(v) for k, v in history(run_dir).items()}
    if state_path.exists():
        with np.load(state_path) as z:
            arrays = {k: z[k] for k in z.files}
        if str(arrays.pop("optimizer")) != cfg.optimizer:
            raise WMError(f"{state_path} was written by a different optimizer; use a new run folder")
        start, best_params = int(arrays.pop("generation")), arrays.pop("best_params")
        best_return = float(arrays.pop("best_return"))
        es.restore(arrays, keys)
    records = [r for r in read_jsonl(metrics_path) if r.get("stage") == stage and r["generation"] <= start]
    frames_used = sum(r.get("real_frames", 0) for r in records)

    bar = tqdm(total=cfg.generations, initial=start, desc=f"{stage} ({cfg.optimizer})", unit="gen",
               disable=not progress)
    try:
        for g in range(start, cfg.generations):
            if cfg.frame_budget and frames_used >= cfg.frame_budget:
                print(f"{stage}: frame budget {cfg.frame_budget} reached ({frames_used} real frames) "
                      f"after {g} generations")
                break
            t0 = time.perf_counter()
            ask_key, fit_key, tell_key = jax.random.split(keys(g), 3)
            searched = es.ask(ask_key)
            solutions = full(searched)
            t_fit = time.perf_counter()
            returns = np.asarray(fitness(fit_key, solutions.astype(np.float32)))
            fit_s = time.perf_counter() - t_fit
            mean_returns = returns.mean(axis=1)
            es.tell(tell_key, searched, _loss(mean_returns))
            i = int(np.argmax(mean_returns))
            order = np.argsort(-mean_returns)[:HISTORY_TOP]
            for k, v in (("mean", full(es.mean)), ("top", solutions[order]), ("top_return", mean_returns[order])):
                hist[k] = hist[k][:g] + [np.asarray(v, np.float64)]
            with atomic_write(run_dir / HISTORY_FILE) as f:
                np.savez(f, **{k: np.stack(v) for k, v in hist.items()})  # type: ignore[arg-type]  # numpy stubs: **arrays read as allow_pickle
            if mean_returns[i] > best_return:
                best_return, best_params = float(mean_returns[i]), solutions[i].copy()
                if on_best is not None:
                    on_best(best_params, best_return)
            record = {"stage": stage, "generation": g + 1, "best": float(mean_returns[i]),
                      "mean": float(mean_returns.mean()), "std": float(mean_returns.std()),
                      "best_so_far": best_return, "sigma": es.sigma, "fitness_s": fit_s}
            if (real_frames := getattr(fitness, "frames", None)) is not None:
                record["real_frames"] = real_frames  # real environment frames this generation used
                record["real_frames_saved"] = getattr(fitness, "frames_saved", 0)  # by early termination
                frames_used += real_frames
            if real_score is not None and cfg.real_every and (g + 1) % cfg.real_every == 0:
                real = real_score(best_params)
                record.update(real_mean=real["mean"], real_std=real["std"], real_episodes=len(real["scores"]),
                              real_frames_checked=real.get("frames", 0))
            with atomic_write(state_path) as f:
                np.savez(f, optimizer=np.str_(cfg.optimizer), generation=np.int64(g + 1),
                         best_params=best_params, best_return=np.float64(best_return), **es.state_arrays())
            record["wall_s"] = time.perf_counter() - t0
            append_jsonl(metrics_path, record)
            records.append(record)
            bar.update()
            bar.set_postfix(best=f"{best_return:.1f}", sigma=f"{es.sigma:.3f}")
    finally:
        bar.close()
    return EvolveResult(best_params=np.asarray(best_params), best_return=best_return,
                        generations=len(records), records=records)
