"""The whole method as one resumable run: collect -> V -> encode -> M -> evolve -> evaluate -> iterate.

A run folder holds every stage's output, laid out as `paths.RunPaths` names it: config.json (the
preset the run was started with; a resume with other settings refuses and names them, except more
sim2real iterations, `GROWABLE`), data/ (real episodes of every policy and, after iterations, the
agent's own), vae/, mdnrnn/, evolve/ (the CMA-ES state, history and metrics, the best dream controller
and, with select_candidates, the one chosen on selection-range tracks), agent/ (V, M and C together:
what `wm evaluate --agent` reads), eval.json, iter_K/ (each sim2real iteration: its M, evolution,
agent and evaluation), the recipe's outputs (`Preset.recipe`: wm command lines run after the
iterations, e.g. the results preset's branch rounds in iter_2/, iter_3/) and stages.json (which stages
are done; a re-run skips them).

Env seeds: collections use the training range, every real episode that helps choose C the selection
range, and only the final evaluation the test range (`config.SEED_RANGES`; `seed_plan` lists them
and a run refuses to start when one falls outside its range).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from wmlib.config import Preset, changed_settings, check_seeds, preset_from_dict
from wmlib.data import load_encoded, read_manifest
from wmlib.errors import WMError
from wmlib.files import atomic_write, read_jsonl, write_json
from wmlib.paths import FIDELITY, PARTS, RunPaths, fidelity_dir

DATA_SEED_STRIDE = 100_000  # policy k / iteration i collect on env seeds base + stride * (k or i)
GROWABLE = ("iterations", "recipe")  # settings a resumed run may grow: the done stages stay valid, new ones follow
RECIPE_SEEDS = {"collect": "training", "select": "selection", "dream-sweep": "selection", "evaluate": "test"}


def iteration_seed(preset: Preset, i: int) -> int:
    """First env seed of sim2real iteration i's collections (after the initial policies' blocks)."""
    return preset.collect.seed + DATA_SEED_STRIDE * (len(preset.collect.policies) + i)


def seed_plan(preset: Preset) -> list[tuple[str, str, int, int]]:
    """Every block of real env seeds a pipeline run of `preset` drives on: (use, what, first, count)
    with use "training", "selection" or "test" (`config.SEED_RANGES`)."""
    c, e = preset.collect, preset.evolve
    plan = [("training", f"collect {p}", c.seed + DATA_SEED_STRIDE * k, n) for k, (p, n) in enumerate(c.plan())]
    plan += [("training", f"iter_{i} collect", iteration_seed(preset, i), c.iteration_episodes)
             for i in range(1, preset.iterations + 1) if c.iteration_policies]
    if e.real_every:
        plan.append(("selection", "evolve real checks", e.real_seed, e.real_episodes))
    if e.select_candidates:
        plan.append(("selection", "select C", e.real_seed, e.select_episodes))
    plan.append(("test", "evaluate", preset.evaluate.seed, preset.evaluate.episodes))
    for j, args in enumerate(recipe_commands(preset, Path("{run}")), 1):
        if args.command in RECIPE_SEEDS:
            what = f"recipe {j}: {args.command}" + (f" {args.policy}" if args.command == "collect" else "")
            plan.append((RECIPE_SEEDS[args.command], what, args.seed, args.episodes))
    return plan


def recipe_commands(preset: Preset, run_dir: Path, workers: int | None = None, fast: bool = True) -> list:
    """The preset's recipe lines read by `wm`'s own parser, {run} replaced by `run_dir`; the pipeline's
    `workers` and renderer apply to the commands that take them. A line that does not parse, or that runs
    a pipeline itself (pipeline, iterate, export), is a `WMError` naming it."""
    import shlex

    from wmlib.cli import build_parser

    parser, out = build_parser(), []
    for j, line in enumerate(preset.recipe, 1):
        try:
            args = parser.parse_args(shlex.split(line.replace("{run}", str(run_dir))))
        except SystemExit:  # argparse has printed why
            raise WMError(f"preset {preset.name!r}, recipe line {j} is not a wm command line: {line!r}") from None
        if args.command in ("pipeline", "iterate", "export"):
            raise WMError(f"preset {preset.name!r}, recipe line {j}: `wm {args.command}` cannot be a recipe step")
        if workers is not None and hasattr(args, "workers"):
            args.workers = workers
        if not fast and hasattr(args, "stock"):
            args.stock = True
        out.append(args)
    return out


def run_recipe(run_dir: Path, preset: Preset, stages: Stages, workers: int | None, fast: bool) -> None:
    """Each line of `preset.recipe` as the stage "recipe_J/COMMAND", exactly as `wm` runs it (each
    command resumes on its own too)."""
    for j, args in enumerate(recipe_commands(preset, run_dir, workers, fast), 1):
        stages.run(f"recipe_{j}/{args.command}", args.func, args)


def check_seed_plan(preset: Preset) -> None:
    """Refuse a preset that would train or select on test tracks (or report on training ones)."""
    for use, what, first, count in seed_plan(preset):
        check_seeds(use, first, count, f"preset {preset.name!r}, {what}")


class Stages:
    """Book-keeping of a run's stages in stages.json: skip what is done, time what runs."""

    def __init__(self, run_dir: Path):
        self.path = RunPaths(run_dir).stages
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, fn, *args, **kwargs):
        if name in self.done:
            print(f"[{name}] done earlier ({self.done[name]['wall_s']:.0f} s), skipped")
            return None
        print(f"[{name}]")
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        self.done[name] = {"wall_s": time.perf_counter() - t, "order": len(self.done)}
        write_json(self.path, self.done)
        return result


def digest(*parts: bytes) -> str:
    """16 hex digits of the SHA-256 of `parts` one after another: an identity for files and parameters."""
    import hashlib

    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


def vae_id_of(path: str | os.PathLike) -> str:
    """A V's identity for its encodings: 12 hex digits of its checkpoint's hash."""
    return digest(Path(path).read_bytes())[:12]


def matching_vae(mdnrnn_path: str | os.PathLike, *candidates: Path) -> Path:
    """The V that M at `mdnrnn_path` was trained with: the first of `candidates` (V checkpoints), then the
    shipped V, whose id matches the one recorded in M's checkpoint. M only understands its own V's latents."""
    from wmlib.checkpoint import read_header
    from wmlib.paths import SHIPPED

    wanted = read_header(mdnrnn_path)["extra"].get("vae_id")
    candidates = (*candidates, SHIPPED.vae)
    for path in candidates:
        if path.is_file() and vae_id_of(path) == wanted:
            return path
    raise FileNotFoundError(f"none of {', '.join(map(str, candidates))} is the V ({wanted}) that "
                            f"{mdnrnn_path} was trained with")


def assemble_agent(folder: Path, vae: Path, mdnrnn: Path, controller: Path | None = None) -> Path:
    """Copy V, M (and C) into an agent folder, the unit that `evaluate` and the notebooks load."""
    for src, part in ((vae, "V"), (mdnrnn, "M"), (controller, "C")):
        if src is not None:
            copy_file(src, folder / PARTS[part])
    return folder


def copy_file(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` atomically (`files.atomic_write`: a temporary file beside `dst`, then a rename)."""
    with open(src, "rb") as f, atomic_write(dst) as out:
        shutil.copyfileobj(f, out)


def collect_data(preset: Preset, data_dir: Path, workers: int | None, fast: bool) -> None:
    from wmlib.rollouts import collect

    c = preset.collect
    for k, (policy, episodes) in enumerate(c.plan()):
        collect(policy, episodes, data_dir, seed=c.seed + DATA_SEED_STRIDE * k, workers=workers,
                max_steps=c.max_steps, mirror=c.mirror, fast=fast)


def encode(data_dir: Path, vae_path: Path, mirror: bool) -> str:
    from wmlib.data import encode_collection
    from wmlib.vae import encode_frames, load_vae

    vae, _ = load_vae(vae_path)
    vae_id = vae_id_of(vae_path)
    encode_collection(data_dir, lambda frames: encode_frames(vae, frames), vae_id, mirror=mirror)
    return vae_id


def _start(x0, free: np.ndarray):
    """The search's start: x0 (zero if None) with every entry the search may not change at zero."""
    return None if x0 is None else np.where(free, np.asarray(x0, np.float64), 0.0)


def evolve_in_dream(agent_dir: Path, data_dir: Path, vae_id: str, out: Path, cfg, x0=None,
                    workers: int | None = None, fast: bool = True):
    from wmlib.agent import part_path
    from wmlib.controller import free_params, n_params
    from wmlib.evaluate import evaluate
    from wmlib.evolve import controller_saver, evolve
    from wmlib.fitness import dream_fitness
    from wmlib.mdnrnn import load_mdnrnn

    mdnrnn, _ = load_mdnrnn(part_path(agent_dir, "M"))
    world = digest(part_path(agent_dir, "M").read_bytes(), *(Path(p).read_bytes() for p in cfg.ensemble))
    ensemble = []
    for path in cfg.ensemble:  # more Ms for a pessimistic dream (`fitness.dream_fitness`)
        m, header = load_mdnrnn(path)
        if header["extra"].get("vae_id") != vae_id:
            raise WMError(f"evolve.ensemble: {path} was trained on latents of V {header['extra'].get('vae_id')}, "
                          f"not of {part_path(agent_dir, 'V')} ({vae_id})")
        ensemble.append(m)
    fitness = dream_fitness(mdnrnn, load_encoded(data_dir, vae_id), cfg, ensemble)

    def real_score(params):
        return evaluate(agent_dir, cfg.real_episodes, seed=cfg.real_seed, workers=workers, fast=fast,
                        controller_params=params, progress=False)

    save_best = controller_saver(out / PARTS["C"], mdnrnn.z_dim, mdnrnn.hidden, optimizer=cfg.optimizer)
    free = free_params(mdnrnn.z_dim, mdnrnn.hidden, cfg.inputs)
    return evolve(fitness, n_params(mdnrnn.z_dim, mdnrnn.hidden), cfg, out, x0=_start(x0, free), on_best=save_best,
                  real_score=real_score if cfg.real_every else None, free=free, world=f"M {world}")


def select_controller(stage: RunPaths, cfg, max_steps: int = 1000, workers: int | None = None,
                      fast: bool = True) -> dict:
    """Choose C by reality, not by the dream: the final search mean and the `select_candidates - 1`
    best candidates of the last 5 generations of `stage`'s evolution (by dream return) (`choose_by_reality`
    on `select_episodes` tracks from `real_seed`)."""
    from wmlib.evolve import history

    h = history(stage.evolve_dir)
    top, top_ret = h["top"][-5:].reshape(-1, h["top"].shape[-1]), h["top_return"][-5:].reshape(-1)
    order = np.argsort(-top_ret)[:max(cfg.select_candidates - 1, 0)]
    candidates = [("mean", h["mean"][-1], float("nan"))] + [(f"top_{j}", top[i], float(top_ret[i]))
                                                           for j, i in enumerate(order)]
    return choose_by_reality(stage, candidates, cfg.select_episodes, cfg.real_seed, max_steps, workers, fast)


def choose_by_reality(stage: RunPaths, candidates: list[tuple[str, np.ndarray, float]], episodes: int, seed: int,
                      max_steps: int = 1000, workers: int | None = None, fast: bool = True,
                      extra: dict | None = None, screen: int = 0, finalists: int = 1) -> dict:
    """Each candidate (name, C's flat parameters, its dream return) with `stage`'s V and M drives `episodes`
    real episodes on selection-range tracks (env seeds `seed`..); the best real mean wins. Writes
    `stage.selected` and `stage.selection` (every candidate's scores and the real frames used).

    With `screen` (fewer than `episodes`), every candidate first drives the first `screen` of those tracks,
    and only the `finalists` best of them drive the rest: many candidates for the frames of a few, the
    choice still made on all `episodes` tracks (a screen of 16 tracks tells a driver from a C that leaves
    the road, not two drivers apart). A row's "scores" are the tracks it drove, in order.

    Resumable: `stage.selection` is rewritten after every drive ("chosen" null until the choice), and
    a rerun keeps the rows of candidates with the same name and parameters, driven by the same V and M
    on the same tracks (`agent_sha256`, `controller_sha256`, seed, episodes, max_steps), and drives on
    from where each stopped. `extra` (e.g. how the M was chosen) is written into it as it is."""
    from wmlib.controller import from_flat, save_controller
    from wmlib.evaluate import evaluate
    from wmlib.mdnrnn import load_mdnrnn

    screen = screen if 0 < screen < episodes and finalists < len(candidates) else 0
    agent = digest(stage.agent_part("V").read_bytes(), stage.agent_part("M").read_bytes())
    setting = {"seed": seed, "episodes": episodes, "max_steps": max_steps, "agent_sha256": agent}
    before = json.loads(stage.selection.read_text()) if stage.selection.exists() else {}
    kept = ({r["name"]: r for r in before["candidates"] if "controller_sha256" in r}
            if all(before.get(k) == v for k, v in setting.items()) else {})
    setting |= {"screen": screen, "finalists": finalists} if screen else {}
    rows: dict[str, dict] = {}

    def drive(name: str, x: np.ndarray, dream: float, tracks: int) -> None:
        key = digest(np.asarray(x, np.float32).tobytes())
        row = rows.get(name) or kept.get(name)
        if row is None or row["controller_sha256"] != key:
            row = {"name": name, "controller_sha256": key, "scores": [], "frames": 0}
        if len(row["scores"]) < tracks:
            r = evaluate(stage.agent_dir, tracks - len(row["scores"]), seed=seed + len(row["scores"]),
                         workers=workers, max_steps=max_steps, fast=fast, controller_params=x, progress=False)
            row = {**row, "scores": row["scores"] + r["scores"], "frames": row["frames"] + r["frames"]}
        row = {**row, "real_mean": float(np.mean(row["scores"])), "real_std": float(np.std(row["scores"])),
               "dream_return": dream}  # a kept row takes the dream's latest score
        rows[name] = row
        write_json(stage.selection, {"chosen": None, **setting, **(extra or {}),
                                     "frames": sum(r["frames"] for r in rows.values()),
                                     "candidates": list(rows.values())})
        print(f"  candidate {name}: dream {dream:.1f}, real {row['real_mean']:.1f} +- {row['real_std']:.1f} "
              f"({len(row['scores'])} selection tracks)", flush=True)

    for name, x, dream in candidates:
        drive(name, x, dream, screen or episodes)
    final = candidates
    if screen:
        final = sorted(candidates, key=lambda c: -np.mean(rows[c[0]]["scores"][:screen]))[:finalists]
        for name, x, dream in final:
            drive(name, x, dream, episodes)
    name, x, _ = max(final, key=lambda c: rows[c[0]]["real_mean"])
    m, _ = load_mdnrnn(stage.agent_part("M"))
    save_controller(stage.selected, from_flat(jnp.asarray(x, jnp.float32), m.z_dim, m.hidden),
                    extra={"selected": name})
    result = {"chosen": name, **setting, **(extra or {}), "frames": sum(r["frames"] for r in rows.values()),
              "candidates": list(rows.values())}
    write_json(stage.selection, result)
    return result


def dream_pool(mdnrnn: Path, data_dir: Path, vae_id: str, cfg, evolutions: list[Path], count: int,
               dreams: int = 256) -> tuple[np.ndarray, list[tuple[str, np.ndarray, float]]]:
    """Every generation's search mean of `evolutions` scored in `dreams` dreams of M (`cfg`'s dream, its
    `episode_len`; the same dreams for all: common random numbers). Returns the final means' dream returns
    (one per evolution) and the `count` other means the dream rates best, as candidates for
    `choose_by_reality`: ("seed_S/gen_G", C's flat parameters, dream return). A 400-step dream ranks the
    means of its own evolution like reality (Spearman 0.73), but an evolution's last mean is not always
    its best."""
    from wmlib.evolve import history
    from wmlib.fidelity import dream_scores
    from wmlib.fitness import dream_params
    from wmlib.mdnrnn import load_mdnrnn

    means = [history(e)["mean"] for e in evolutions]
    params = dream_params(load_mdnrnn(mdnrnn)[0], load_encoded(data_dir, vae_id), cfg)
    scores = dream_scores(params, np.concatenate(means), horizons=(cfg.episode_len,), rollouts=dreams,
                          progress=False)[:, 0]
    named, finals, at = [], [], 0
    for e, m in zip(evolutions, means):
        finals.append(float(scores[at + len(m) - 1]))
        named += [(f"{e.name}/gen_{g + 1}", m[g], float(scores[at + g])) for g in range(len(m) - 1)]
        at += len(m)
    return np.asarray(finals), sorted(named, key=lambda c: -c[2])[:count]


def reference_returns(mdnrnns: Sequence[Path], data_dir: Path, vae_id: str, cfg, dreams: int = 256) -> dict[str, float]:
    """{M's path: what its dream pays the reference controller} (`fidelity.reference_return`: straight ahead at
    half gas; `cfg`'s dream, `episode_len` steps, the same `dreams` dreams for every M)."""
    from wmlib.fidelity import reference_return
    from wmlib.fitness import dream_params
    from wmlib.mdnrnn import load_mdnrnn

    encoded = load_encoded(data_dir, vae_id)
    return {str(p): reference_return(dream_params(load_mdnrnn(p)[0], encoded, cfg), dreams) for p in mdnrnns}


def evolve_and_choose(stage: RunPaths, vae: Path, mdnrnns: Sequence[Path], data_dir: Path, cfg, runs: int,
                      episodes: int, seed: int, max_steps: int = 1000, workers: int | None = None, fast: bool = True,
                      pool: int = 0, incumbent: Path | None = None, screen: int = 0, finalists: int = 1) -> dict:
    """`runs` evolutions of C in the dream of each M of `mdnrnns` (trained on `vae`'s latents), chosen between
    by reality on `episodes` selection tracks from `seed`; `stage.agent_dir` gets V, the chosen C and the M it
    was evolved in (`dream_choice` for one M).

    Several Ms (e.g. draws of the same training with other seeds): each gets its own `dream_choice` in the
    sub-stage `stage.root`/m_K (K: its place in `mdnrnns`), on the same tracks, and the best of their winners
    wins, so the chosen C is the best of all their candidates. Ms trained alike differ in how well the C's
    evolved in their dreams drive, and nothing cheaper than reality has told them apart on every draw (the
    reference controller's dream return, recorded for each M in selection.json, chose wrong on one of three:
    docs/results.md). `incumbent` joins the choice of the M it drives with (`dream_choice`); `screen` and
    `finalists` apply to each M's choice (`choose_by_reality`)."""
    from wmlib.agent import part_path

    check_seeds("selection", seed, episodes, f"choosing C for {stage.root}")  # before hours of evolution
    if incumbent is not None:
        _check_incumbent(incumbent, "V", [vae])
        _check_incumbent(incumbent, "M", mdnrnns)
    reference = reference_returns(mdnrnns, data_dir, vae_id_of(vae), cfg)
    for p, r in reference.items():
        print(f"  M {p}: the reference controller's dream return {r:.1f}")
    extra = {"reference_dream_return": reference}
    if len(mdnrnns) == 1:
        return dream_choice(stage, vae, Path(mdnrnns[0]), data_dir, cfg, runs, episodes, seed, max_steps, workers,
                            fast, pool, incumbent, extra, screen, finalists)
    choices = []
    for k, m in enumerate(mdnrnns):
        own = incumbent if incumbent is not None and part_path(incumbent, "M").read_bytes() == m.read_bytes() else None
        sub = RunPaths(stage.root / f"m_{k}")
        print(f"  M {m} (its choice in {sub.root}):")
        choices.append((sub, dream_choice(sub, vae, Path(m), data_dir, cfg, runs, episodes, seed, max_steps, workers,
                                          fast, pool, own, extra, screen, finalists)))
    best = int(np.argmax([next(r["real_mean"] for r in c["candidates"] if r["name"] == c["chosen"])
                          for _, c in choices]))
    sub, choice = choices[best]
    rows = [{**r, "name": f"{s.root.name}/{r['name']}"} for s, c in choices for r in c["candidates"]]
    result = {**choice, "chosen": f"{sub.root.name}/{choice['chosen']}", "frames": sum(r["frames"] for r in rows),
              "candidates": rows}
    assemble_agent(stage.agent_dir, vae, Path(choice["mdnrnn"]), sub.selected)
    copy_file(sub.selected, stage.selected)
    _hand_on_log(sub.evolve_metrics, stage)
    write_json(stage.selection, result)
    print(f"  chosen: {result['chosen']} (M {choice['mdnrnn']})")
    return result


def _check_incumbent(incumbent: Path, part: str, ours: Sequence[Path]) -> None:
    from wmlib.agent import part_path

    if all(part_path(incumbent, part).read_bytes() != Path(p).read_bytes() for p in ours):
        raise WMError(f"incumbent {incumbent}: its {part} ({part_path(incumbent, part)}) is not "
                      f"{' or '.join(map(str, ours))}; the incumbent must drive with the V and M of this choice")


def dream_choice(stage: RunPaths, vae: Path, mdnrnn: Path, data_dir: Path, cfg, runs: int, episodes: int, seed: int,
                 max_steps: int = 1000, workers: int | None = None, fast: bool = True, pool: int = 0,
                 incumbent: Path | None = None, extra: dict | None = None, screen: int = 0, finalists: int = 1) -> dict:
    """`runs` evolutions of C in the dream of `mdnrnn`, evolution seeds cfg.seed, cfg.seed + 1, ..., each
    from zero into `stage.evolve_dir`/seed_S (resumable); their final search means, and with `pool` the
    dream's `pool` best earlier search means of any of them (`dream_pool`, 256 dreams each), are chosen
    between by reality (`choose_by_reality`, with its `screen` and `finalists`), and `stage.agent_dir` gets
    V, M and the chosen C. The chosen
    evolution's log is copied to `stage.evolve_metrics`. Evolutions vary a lot in the dream; reality picks.

    `incumbent` (an agent folder with the same V and M, e.g. an earlier round's; `evolve_and_choose` checks
    that) joins the candidates with its C ("incumbent"): a new round hands on a new C only if reality
    prefers it."""
    from wmlib.agent import agent_folder, part_path
    from wmlib.controller import load_controller, to_flat
    from wmlib.evolve import history

    vae_id = vae_id_of(vae)
    champion = []
    if incumbent is not None:
        champion.append(("incumbent", np.asarray(to_flat(load_controller(part_path(incumbent, "C"))[0])), np.nan))
    assemble_agent(stage.agent_dir, vae, mdnrnn)
    evolutions = []
    for r in range(runs):
        c = dataclasses.replace(cfg, seed=cfg.seed + r, select_candidates=0, real_every=0)
        evolutions.append(stage.evolve_dir / f"seed_{c.seed}")
        evolve_in_dream(stage.agent_dir, data_dir, vae_id, evolutions[-1], c, workers=workers, fast=fast)
    finals, earlier = (dream_pool(mdnrnn, data_dir, vae_id, cfg, evolutions, pool) if pool
                       else (np.full(runs, np.nan), []))
    candidates = [(e.name, history(e)["mean"][-1], float(d)) for e, d in zip(evolutions, finals)] + earlier
    result = choose_by_reality(stage, candidates + champion, episodes, seed, max_steps, workers, fast,
                               extra={"mdnrnn": str(mdnrnn), **(extra or {})}, screen=screen, finalists=finalists)
    log = (RunPaths(agent_folder(incumbent).parent).evolve_metrics  # the incumbent's stage, laid out as a run
           if incumbent is not None and result["chosen"] == "incumbent"
           else stage.evolve_dir / result["chosen"].split("/")[0] / "metrics.jsonl")
    _hand_on_log(log, stage)
    assemble_agent(stage.agent_dir, vae, mdnrnn, stage.selected)
    return result


def _hand_on_log(log: Path, stage: RunPaths) -> None:
    """`stage`'s evolution log becomes a copy of `log`, the chosen C's evolution (none when it has none)."""
    if log.exists():
        copy_file(log, stage.evolve_metrics)
    else:
        stage.evolve_metrics.unlink(missing_ok=True)


def chosen_controller(stage: RunPaths, cfg) -> Path:
    """The controller an evolution stage hands on: the selected one, else the best in the dream."""
    return stage.selected if cfg.select_candidates else stage.dream_best


def evolve_in_real(agent_dir: Path, out: Path, cfg, max_steps: int = 1000, x0=None, workers: int | None = None,
                   fast: bool = True, batch: int = 16, patience: int | None = 100):
    """CMA-ES with every candidate scored on real episodes (population x repeats over the workers, in
    lockstep blocks of `batch`; an episode ends after `patience` steps without a new tile)."""
    from wmlib.agent import part_path
    from wmlib.controller import free_params, n_params
    from wmlib.evolve import controller_saver, evolve
    from wmlib.fitness import RealFitness
    from wmlib.mdnrnn import load_mdnrnn

    mdnrnn, _ = load_mdnrnn(part_path(agent_dir, "M"))
    fitness = RealFitness(agent_dir, cfg.repeats, max_steps, workers, fast, batch, patience)
    save_best = controller_saver(out / PARTS["C"], mdnrnn.z_dim, mdnrnn.hidden, optimizer=cfg.optimizer)
    free = free_params(mdnrnn.z_dim, mdnrnn.hidden, cfg.inputs)
    return evolve(fitness, n_params(mdnrnn.z_dim, mdnrnn.hidden), cfg, out, x0=_start(x0, free), on_best=save_best,
                  stage="evolve", free=free)


def sweep_file(setting: str) -> str:
    """The file a dream sweep over `setting` writes (tau_sweep.json, inputs_sweep.json)."""
    return f"{setting}_sweep.json"


def dream_sweep(agent_dir: Path, data_dir: Path, out: Path, cfg, setting: str, values, episodes: int,
                runs: int = 1, seed: int = 0, max_steps: int = 1000, dream_rollouts: int = 64,
                workers: int | None = None, fast: bool = True) -> dict:
    """The paper's two experiments on this agent's V and M, with C trained in the dream: for each value
    of one evolution setting (`setting` "tau": the temperature table; "inputs": V only vs V and M) and
    each of `runs` evolution seeds (cfg.seed + r), C is evolved in the dream from zero
    (`evolve_in_dream` into OUT/SETTING_VALUE/seed_S), its final search mean scored in
    `dream_rollouts` dreams of its own kind and on `episodes` real episodes (env seeds seed.., at most
    `max_steps` steps: this reports, it chooses nothing). The C is the dream's own choice, with no real
    selection, so the table shows what the setting alone does; several runs show the luck of a run.
    Resumable: an evolution that finished is not rerun. Writes and returns OUT/SETTING_sweep.json, a row
    per (value, run): {"setting", "value", "run_seed", "dream_mean", "dream_std", "real_mean",
    "real_std", "scores", "episodes", "seed", "max_steps", "evolve"}.
    """
    from wmlib.agent import part_path
    from wmlib.dream import population_returns
    from wmlib.evaluate import evaluate
    from wmlib.evolve import history
    from wmlib.fitness import dream_params
    from wmlib.mdnrnn import load_mdnrnn

    vae_id = vae_id_of(part_path(agent_dir, "V"))
    mdnrnn, _ = load_mdnrnn(part_path(agent_dir, "M"))
    encoded = load_encoded(data_dir, vae_id)
    rows: dict[str, list] = {k: [] for k in ("value", "run_seed", "dream_mean", "dream_std", "real_mean", "real_std",
                                             "scores")}
    plan = [(value, dataclasses.replace(cfg, **{setting: value}, seed=cfg.seed + r, select_candidates=0,
                                        real_every=0)) for value in values for r in range(runs)]  # bad values fail here
    for value, c in plan:
        run = out / f"{setting}_{format(value, 'g') if isinstance(value, float) else value}" / f"seed_{c.seed}"
        evolve_in_dream(agent_dir, data_dir, vae_id, run, c)
        x = history(run)["mean"][-1]
        dream = np.asarray(population_returns(jax.random.PRNGKey(seed), jnp.asarray(x, jnp.float32)[None],
                                              dream_params(mdnrnn, encoded, c), dream_rollouts, c.episode_len))[0]
        real = evaluate(agent_dir, episodes, seed=seed, workers=workers, max_steps=max_steps, fast=fast,
                        controller_params=x, progress=False)
        for k, v in (("value", value), ("run_seed", c.seed), ("dream_mean", float(dream.mean())),
                     ("dream_std", float(dream.std())), ("real_mean", real["mean"]), ("real_std", real["std"]),
                     ("scores", real["scores"])):
            rows[k].append(v)
        print(f"{setting} {value} (evolution seed {c.seed}): dream {dream.mean():.1f} +- {dream.std():.1f}, "
              f"real {real['mean']:.1f} +- {real['std']:.1f} ({episodes} episodes)", flush=True)
    result = {"setting": setting, **rows, "episodes": episodes, "seed": seed, "max_steps": max_steps,
              "evolve": dataclasses.asdict(cfg)}
    write_json(out / sweep_file(setting), result)
    return result


def evaluate_agent(agent_dir: Path, preset: Preset, out: Path, workers: int | None, fast: bool) -> dict:
    from wmlib.evaluate import evaluate

    e = preset.evaluate
    result = evaluate(agent_dir, e.episodes, seed=e.seed, workers=workers, max_steps=e.max_steps, fast=fast)
    write_json(out, result)
    return result


def train_stages(run_dir: Path, preset: Preset, stages: Stages, workers: int | None, fast: bool) -> None:
    """collect -> V -> encode -> M -> evolve -> agent -> evaluate."""
    from wmlib.mdnrnn import train_mdnrnn
    from wmlib.vae import train_vae

    run = RunPaths(run_dir)
    stages.run("collect", collect_data, preset, run.data, workers, fast)
    stages.run("vae", train_vae, run.data, run.vae_dir, preset.vae)
    vae_id = vae_id_of(run.vae)
    stages.run("encode", encode, run.data, run.vae, preset.collect.mirror)
    stages.run("mdnrnn", train_mdnrnn, load_encoded(run.data, vae_id), run.mdnrnn_dir, preset.rnn, vae_id)
    assemble_agent(run.agent_dir, run.vae, run.mdnrnn)
    stages.run("evolve", evolve_in_dream, run.agent_dir, run.data, vae_id, run.evolve_dir, preset.evolve,
               workers=workers, fast=fast)
    if preset.evolve.select_candidates:
        stages.run("select", select_controller, run, preset.evolve, preset.evaluate.max_steps, workers, fast)
    assemble_agent(run.agent_dir, run.vae, run.mdnrnn, chosen_controller(run, preset.evolve))
    stages.run("evaluate", evaluate_agent, run.agent_dir, preset, run.eval, workers, fast)


def iterate(run_dir: Path, i: int, preset: Preset, stages: Stages, workers: int | None = None,
            fast: bool = True) -> None:
    """Sim2real iteration i (1, 2, ...): episodes of `collect.iteration_policies` (the current agent's
    own, "controller", where it fails; fresh recovery episodes) join the data; M is fine-tuned on the
    union (mirrored encodings included), C is re-evolved from the previous one (and chosen by
    selection-range episodes when configured), and the new agent is evaluated."""
    from wmlib.mdnrnn import load_mdnrnn, train_mdnrnn
    from wmlib.controller import load_controller, to_flat
    from wmlib.rollouts import collect

    run = RunPaths(run_dir)
    prev, it = (run if i == 1 else run.iteration(i - 1)), run.iteration(i)
    c = preset.collect
    seed = iteration_seed(preset, i)
    stages.run(f"iter_{i}/collect", lambda: [
        collect(p, c.iteration_episodes, run.data, seed=seed, workers=workers, max_steps=c.max_steps,
                mirror=c.mirror, fast=fast, policy_kwargs={"agent": str(prev.agent_dir)} if p == "controller" else None)
        for p in c.iteration_policies])
    vae_path = prev.agent_part("V")
    vae_id = vae_id_of(vae_path)
    stages.run(f"iter_{i}/encode", encode, run.data, vae_path, c.mirror)
    stages.run(f"iter_{i}/mdnrnn", lambda: train_mdnrnn(load_encoded(run.data, vae_id), it.mdnrnn_dir, preset.rnn,
                                                          vae_id, init=load_mdnrnn(prev.agent_part("M"))[0]))
    assemble_agent(it.agent_dir, vae_path, it.mdnrnn)
    x0 = np.asarray(to_flat(load_controller(prev.agent_part("C"))[0]))  # the previous agent's C
    stages.run(f"iter_{i}/evolve", evolve_in_dream, it.agent_dir, run.data, vae_id, it.evolve_dir, preset.evolve,
               x0=x0, workers=workers, fast=fast)
    if preset.evolve.select_candidates:
        stages.run(f"iter_{i}/select", select_controller, it, preset.evolve, preset.evaluate.max_steps, workers, fast)
    assemble_agent(it.agent_dir, vae_path, it.mdnrnn, chosen_controller(it, preset.evolve))
    stages.run(f"iter_{i}/evaluate", evaluate_agent, it.agent_dir, preset, it.eval, workers, fast)


def real_frames(run_dir: Path) -> dict[str, int]:
    """The real frames the method used in a run: collected data (all policies and iterations, and any
    collection of the recipe; mirror images are not new frames), branches (each replay to its branch
    point and the branch: `data.branch_steps`), real checks during evolution and the selection of C;
    test evaluations are not part of the method."""
    from wmlib.data import branch_steps

    run = RunPaths(run_dir)
    recipe = recipe_commands(preset_from_dict(json.loads(run.config.read_text())), run.root) if run.config.exists() \
        else []  # a folder laid out as a run without its settings (a lesson's loop): no recipe
    folders = {run.data, *(Path(a.out) for a in recipe if a.command == "collect")}
    data = sum(e["steps"] for f in folders for e in read_manifest(f).values() if not e.get("mirrored"))
    branch_dirs = [Path(a.out) for a in recipe if a.command == "branches" and Path(a.out).is_dir()]
    branches = branch_steps(*branch_dirs) if branch_dirs else 0
    stages = [run, *run.iterations()]
    checks = sum(r.get("real_frames_checked", 0) for s in stages for r in read_jsonl(s.evolve_metrics))
    select = sum(json.loads(s.selection.read_text())["frames"] for s in stages if s.selection.exists())
    return {"data": data, "branches": branches, "evolve_checks": checks, "selection": select,
            "total": data + branches + checks + select}


def summary(run_dir: Path) -> tuple[list[dict], dict]:
    """One row per agent of the run (real mean +- std, best dream score, real frames the method used
    in the whole run), and the stages' wall times."""
    run = RunPaths(run_dir)
    stages = json.loads(run.stages.read_text())
    rows = []
    for name, stage in [("initial", run)] + [(it.root.name, it) for it in run.iterations()]:
        if not stage.eval.exists():
            continue
        ev = json.loads(stage.eval.read_text())
        evo = [r for r in read_jsonl(stage.evolve_metrics) if r.get("stage") == "evolve"]
        rows.append({"agent": name, "real_mean": ev["mean"], "real_std": ev["std"], "episodes": ev["episodes"],
                     "dream_best": evo[-1]["best_so_far"] if evo else float("nan")})
    frames = real_frames(run_dir)
    for row in rows:
        row["data_frames_total"] = frames["data"]
        row["real_frames_total"] = frames["total"]
    evolution = evolution_of_final_c(run)
    fidelity = fidelity_dir(evolution) / FIDELITY
    if rows and fidelity.exists():
        rows[-1]["spearman"] = json.loads(fidelity.read_text())["rank"]["spearman"]
        rows[-1]["fidelity_of"] = str(evolution.relative_to(run.root))
    return rows, stages


def evolution_of_final_c(run: RunPaths) -> Path:
    """The evolution folder that made the final agent's C: the final stage's evolve/ folder, or, where
    reality chose among candidates (selection.json), the chosen one's evolution (evolve/seed_S of
    `dream_choice`, in m_K/ where `evolve_and_choose` chose between Ms); a kept incumbent (an earlier
    round's C) is traced by its parameters' hash to the stage whose own choice it was."""
    def chosen(stage: RunPaths) -> dict | None:
        sel = json.loads(stage.selection.read_text()) if stage.selection.exists() else {}
        return next((r for r in sel.get("candidates", []) if r["name"] == sel.get("chosen")), None)

    def incumbent(row: dict) -> bool:
        return row["name"].split("/")[-1] == "incumbent"

    def evolution(stage: RunPaths, name: str) -> Path:
        head, _, rest = name.partition("/")  # "seed_1", "seed_7/gen_23", "m_1/seed_0"; "mean", "top_0"
        if re.fullmatch(r"m_\d+", head):
            return evolution(RunPaths(stage.root / head), rest)
        folder = stage.evolve_dir / head
        return folder if folder.is_dir() else stage.evolve_dir

    final = run.final()
    row = chosen(final)
    if row is None:
        return final.evolve_dir
    if not incumbent(row):
        return evolution(final, row["name"])
    for stage in [run, *run.iterations()]:
        own = chosen(stage)
        if own and not incumbent(own) and own.get("controller_sha256", 0) == row.get("controller_sha256"):
            return evolution(stage, own["name"])
    return final.evolve_dir


def format_summary(rows: list[dict], stages: dict) -> str:
    lines = ["agent        real mean +- std (episodes)   dream best", "-" * 56]
    for r in rows:
        lines.append(f"{r['agent']:<12} {r['real_mean']:8.1f} +- {r['real_std']:6.1f} ({r['episodes']:3d})"
                     f"      {r['dream_best']:8.1f}")
    if rows:
        lines.append(f"real frames collected for training: {rows[-1]['data_frames_total']}; used by the method in "
                     f"all (data, branches, real checks, selection of C): {rows[-1]['real_frames_total']}")
    if rows and "spearman" in rows[-1]:
        by_horizon = sorted(rows[-1]["spearman"].items(), key=lambda kv: int(kv[0]))
        lines.append(f"dream fidelity of the evolution that made C ({rows[-1]['fidelity_of']}), Spearman(dream, real) "
                     "by dream horizon: " +
                     ", ".join(f"{h}: {v:.2f}" for h, v in by_horizon))
    ordered = sorted(stages.items(), key=lambda kv: kv[1].get("order", 0))
    lines.append("wall time per stage: " + ", ".join(f"{k} {v['wall_s']:.0f}s" for k, v in ordered))
    lines.append(f"total: {sum(v['wall_s'] for v in stages.values()) / 60:.1f} min")
    return "\n".join(lines)


def export_agent(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copy a run's final agent with what made it into `out`, laid out as a run (`RunPaths`), as
    data/pretrained is: config.json, summary.txt, eval.json (test range), vae/ (V and its metrics), mdnrnn/
    (the final M and its metrics), evolve/ (the final evolution's metrics and selection.json) and agent/.
    Not the data, the training states or earlier iterations. The M is the agent's; its metrics come from
    the folder of the run where that M was trained (a stage may dream in an M of an earlier one)."""
    run, shipped = RunPaths(run_dir), RunPaths(out)
    final = run.final()
    if not final.eval.exists():
        raise FileNotFoundError(f"{run.root} has no evaluated agent yet (no {final.eval}): finish the pipeline first")
    m = final.agent_part("M").read_bytes()
    trained = [p.parent for p in sorted(run.root.glob("**/mdnrnn.eqx"))
               if (p.parent / "metrics.jsonl").exists() and p.read_bytes() == m]
    copies = {shipped.config: run.config, shipped.summary: run.summary, shipped.eval: final.eval,
              shipped.vae: run.vae, shipped.vae_metrics: run.vae_metrics, shipped.mdnrnn: final.agent_part("M"),
              shipped.mdnrnn_metrics: trained[0] / "metrics.jsonl" if trained else final.mdnrnn_metrics,
              shipped.evolve_metrics: final.evolve_metrics, shipped.selection: final.selection,
              **{shipped.agent_part(part): final.agent_part(part) for part in PARTS}}
    for dst, src in copies.items():
        if src.exists():
            copy_file(src, dst)
    return shipped.root


def run_pipeline(preset: Preset, run_dir: str | os.PathLike, workers: int | None = None, fast: bool = True) -> str:
    """Run (or resume) every stage of `preset` in `run_dir`; returns the summary table.

    The first start writes RUN_DIR/config.json; a resume with other settings refuses and names each
    difference ("section.field: old -> new"), except settings in `GROWABLE` that grew (more iterations).
    """
    run_dir = Path(run_dir)
    run = RunPaths(run_dir)
    check_seed_plan(preset)
    before = preset_from_dict(json.loads(run.config.read_text())) if run.config.exists() else None
    if before is not None and (changed := changed_settings(before, preset, GROWABLE)):
        raise WMError(f"{run_dir} holds a run with other settings ({'; '.join(changed)}); resume it with the "
                      "same settings or start a new run folder")
    if before != preset:  # the first start, or more iterations: written, else left as it is
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.config, preset.to_dict())
    stages = Stages(run_dir)
    train_stages(run_dir, preset, stages, workers, fast)
    for i in range(1, preset.iterations + 1):
        iterate(run_dir, i, preset, stages, workers, fast)
    run_recipe(run_dir, preset, stages, workers, fast)
    table = format_summary(*summary(run_dir))
    with atomic_write(run.summary, "w") as f:
        f.write(table + "\n")
    return table
