"""The whole method as one resumable run: collect -> V -> encode -> M -> evolve -> evaluate -> iterate.

A run folder holds every stage's output:
  config.json       the preset the run was started with
  data/             real episodes of every policy (and, after iterations, the agent's own), encoded/
  vae/ mdnrnn/      checkpoints and metrics of V and M
  evolve/           the CMA-ES state, metrics and best controller
  agent/            V, M and C together: what `wm evaluate --agent` reads
  iter_K/           each sim2real iteration: its M, evolution, agent and evaluation
  stages.json       which stages are done and their wall time; a re-run skips them
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from wmlib.config import Preset
from wmlib.data import load_encoded, read_manifest
from wmlib.files import read_jsonl, write_json

DATA_SEED_STRIDE = 100_000  # policy k / iteration i collect on env seeds base + stride * (k or i)


class Stages:
    """Book-keeping of a run's stages in stages.json: skip what is done, time what runs."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
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


def vae_id_of(path: str | os.PathLike) -> str:
    """A V's identity for its encodings: 12 hex digits of its checkpoint's hash."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def matching_vae(mdnrnn_path: str | os.PathLike, *folders: str | os.PathLike) -> Path:
    """The V that M at `mdnrnn_path` was trained with: the first FOLDER/vae.eqx (then the shipped one)
    whose id matches the one recorded in M's checkpoint. M only understands its own V's latents."""
    from wmlib.checkpoint import read_header
    from wmlib.config import PRETRAINED_DIR

    wanted = read_header(mdnrnn_path)["extra"].get("vae_id")
    candidates = [Path(f) / "vae.eqx" for f in folders] + [PRETRAINED_DIR / "vae.eqx"]
    for path in candidates:
        if path.is_file() and vae_id_of(path) == wanted:
            return path
    raise FileNotFoundError(f"none of {', '.join(map(str, candidates))} is the V ({wanted}) that "
                            f"{mdnrnn_path} was trained with")


def assemble_agent(folder: Path, vae: Path, mdnrnn: Path, controller: Path | None = None) -> Path:
    """Copy V, M (and C) into an agent folder, the unit that `evaluate` and the notebooks load."""
    folder.mkdir(parents=True, exist_ok=True)
    for src, name in ((vae, "vae.eqx"), (mdnrnn, "mdnrnn.eqx"), (controller, "controller.eqx")):
        if src is not None:
            tmp = folder / f".{name}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, folder / name)
    return folder


def collect_data(preset: Preset, data_dir: Path, workers: int | None, fast: bool) -> None:
    from wmlib.rollouts import collect

    c = preset.collect
    for k, policy in enumerate(c.policies):
        collect(policy, c.episodes_per_policy, data_dir, seed=c.seed + DATA_SEED_STRIDE * k, workers=workers,
                max_steps=c.max_steps, fast=fast)


def encode(data_dir: Path, vae_path: Path, mirror: bool) -> str:
    from wmlib.data import encode_collection
    from wmlib.vae import encode_frames, load_vae

    vae, _ = load_vae(vae_path)
    vae_id = vae_id_of(vae_path)
    encode_collection(data_dir, lambda frames: encode_frames(vae, frames), vae_id, mirror=mirror)
    return vae_id


def dream_fitness(mdnrnn, encoded: dict, cfg):
    """CMA-ES fitness in the dream: one jitted call for the whole population."""
    from wmlib.dream import DreamParams, make_start_bank, population_returns

    eps = list(encoded.values())
    bank = make_start_bank([e["mu"] for e in eps], [e["logvar"] for e in eps], [e["actions"] for e in eps])
    params = DreamParams(mdnrnn, bank, tau=cfg.tau, max_steps=cfg.episode_len, start=cfg.start)
    return lambda key, x: population_returns(key, jnp.asarray(x), params, cfg.repeats, cfg.episode_len)


def evolve_in_dream(agent_dir: Path, data_dir: Path, vae_id: str, out: Path, cfg, x0=None,
                    workers: int | None = None, fast: bool = True):
    from wmlib.controller import n_params
    from wmlib.evaluate import evaluate
    from wmlib.evolve import evolve
    from wmlib.mdnrnn import load_mdnrnn

    mdnrnn, _ = load_mdnrnn(agent_dir / "mdnrnn.eqx")
    fitness = dream_fitness(mdnrnn, load_encoded(data_dir, vae_id), cfg)

    def real_score(params):
        return evaluate(agent_dir, cfg.real_episodes, seed=cfg.seed, workers=workers, fast=fast,
                        controller_params=params, progress=False)

    return evolve(fitness, n_params(mdnrnn.z_dim, mdnrnn.hidden), cfg, out, z_dim=mdnrnn.z_dim,
                  hidden=mdnrnn.hidden, x0=x0, real_score=real_score if cfg.real_every else None)


def evolve_in_real(agent_dir: Path, out: Path, cfg, max_steps: int = 1000, x0=None, workers: int | None = None,
                   fast: bool = True):
    """CMA-ES with every candidate scored on real episodes (population x repeats over the workers)."""
    from wmlib.controller import n_params
    from wmlib.evaluate import RealFitness
    from wmlib.evolve import evolve
    from wmlib.mdnrnn import load_mdnrnn

    mdnrnn, _ = load_mdnrnn(agent_dir / "mdnrnn.eqx")
    fitness = RealFitness(agent_dir, cfg.repeats, max_steps, workers, fast)
    return evolve(fitness, n_params(mdnrnn.z_dim, mdnrnn.hidden), cfg, out, z_dim=mdnrnn.z_dim,
                  hidden=mdnrnn.hidden, x0=x0, stage="evolve")


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

    data_dir = run_dir / "data"
    stages.run("collect", collect_data, preset, data_dir, workers, fast)
    stages.run("vae", train_vae, data_dir, run_dir / "vae", preset.vae)
    vae_path = run_dir / "vae" / "vae.eqx"
    vae_id = vae_id_of(vae_path)
    stages.run("encode", encode, data_dir, vae_path, preset.collect.mirror)
    stages.run("mdnrnn", train_mdnrnn, load_encoded(data_dir, vae_id), run_dir / "mdnrnn", preset.rnn, vae_id)
    agent = assemble_agent(run_dir / "agent", vae_path, run_dir / "mdnrnn" / "mdnrnn.eqx")
    stages.run("evolve", evolve_in_dream, agent, data_dir, vae_id, run_dir / "evolve", preset.evolve,
               workers=workers, fast=fast)
    assemble_agent(agent, vae_path, run_dir / "mdnrnn" / "mdnrnn.eqx", run_dir / "evolve" / "controller.eqx")
    stages.run("evaluate", evaluate_agent, agent, preset, run_dir / "eval.json", workers, fast)


def iterate(run_dir: Path, i: int, preset: Preset, stages: Stages, workers: int | None = None,
            fast: bool = True) -> None:
    """Sim2real iteration i (1, 2, ...): the current agent's own episodes (its failures) and fresh
    recovery episodes join the data; M is fine-tuned on the union (mirrored encodings included),
    C is re-evolved from the previous best, and the new agent is evaluated."""
    from wmlib.mdnrnn import load_mdnrnn, train_mdnrnn
    from wmlib.controller import load_controller, to_flat
    from wmlib.rollouts import collect

    prev = run_dir / ("agent" if i == 1 else f"iter_{i - 1}/agent")
    it = run_dir / f"iter_{i}"
    data_dir, c = run_dir / "data", preset.collect
    seed = c.seed + DATA_SEED_STRIDE * (len(c.policies) + i)
    stages.run(f"iter_{i}/collect", lambda: (
        collect("controller", c.episodes_per_policy, data_dir, seed=seed, workers=workers, max_steps=c.max_steps,
                fast=fast, policy_kwargs={"agent": str(prev)}),
        collect("recovery", c.episodes_per_policy, data_dir, seed=seed, workers=workers, max_steps=c.max_steps,
                fast=fast)))
    vae_path = prev / "vae.eqx"
    vae_id = vae_id_of(vae_path)
    stages.run(f"iter_{i}/encode", encode, data_dir, vae_path, c.mirror)
    stages.run(f"iter_{i}/mdnrnn", lambda: train_mdnrnn(load_encoded(data_dir, vae_id), it / "mdnrnn", preset.rnn,
                                                          vae_id, init=load_mdnrnn(prev / "mdnrnn.eqx")[0]))
    agent = assemble_agent(it / "agent", vae_path, it / "mdnrnn" / "mdnrnn.eqx")
    x0 = np.asarray(to_flat(load_controller(prev / "controller.eqx")[0]))
    stages.run(f"iter_{i}/evolve", evolve_in_dream, agent, data_dir, vae_id, it / "evolve", preset.evolve,
               x0=x0, workers=workers, fast=fast)
    assemble_agent(agent, vae_path, it / "mdnrnn" / "mdnrnn.eqx", it / "evolve" / "controller.eqx")
    stages.run(f"iter_{i}/evaluate", evaluate_agent, agent, preset, it / "eval.json", workers, fast)


def summary(run_dir: Path) -> tuple[list[dict], dict]:
    """One row per agent of the run (real mean +- std, best dream score, real frames collected), and the
    stages' wall times."""
    stages = json.loads((run_dir / "stages.json").read_text())
    rows = []
    for name, folder in [("initial", run_dir)] + [(p.name, p) for p in sorted(run_dir.glob("iter_*"))]:
        if not (folder / "eval.json").exists():
            continue
        ev = json.loads((folder / "eval.json").read_text())
        evo = [r for r in read_jsonl(folder / "evolve" / "metrics.jsonl") if r.get("stage") == "evolve"]
        rows.append({"agent": name, "real_mean": ev["mean"], "real_std": ev["std"], "episodes": ev["episodes"],
                     "dream_best": evo[-1]["best_so_far"] if evo else float("nan")})
    manifest = read_manifest(run_dir / "data")
    frames = sum(e["steps"] for e in manifest.values())
    for row in rows:
        row["data_frames_total"] = frames
    return rows, stages


def format_summary(rows: list[dict], stages: dict) -> str:
    lines = ["agent        real mean +- std (episodes)   dream best", "-" * 56]
    for r in rows:
        lines.append(f"{r['agent']:<12} {r['real_mean']:8.1f} +- {r['real_std']:6.1f} ({r['episodes']:3d})"
                     f"      {r['dream_best']:8.1f}")
    if rows:
        lines.append(f"real frames collected for training: {rows[-1]['data_frames_total']}")
    ordered = sorted(stages.items(), key=lambda kv: kv[1].get("order", 0))
    lines.append("wall time per stage: " + ", ".join(f"{k} {v['wall_s']:.0f}s" for k, v in ordered))
    lines.append(f"total: {sum(v['wall_s'] for v in stages.values()) / 60:.1f} min")
    return "\n".join(lines)


def run_pipeline(preset: Preset, run_dir: str | os.PathLike, workers: int | None = None, fast: bool = True) -> str:
    """Run (or resume) every stage of `preset` in `run_dir`; returns the summary table."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    if config_path.exists() and json.loads(config_path.read_text())["name"] != preset.name:
        raise ValueError(f"{run_dir} holds a run of preset {json.loads(config_path.read_text())['name']!r}; "
                         f"use another --run folder for preset {preset.name!r}")
    write_json(config_path, preset.to_dict())
    stages = Stages(run_dir)
    train_stages(run_dir, preset, stages, workers, fast)
    for i in range(1, preset.iterations + 1):
        iterate(run_dir, i, preset, stages, workers, fast)
    table = format_summary(*summary(run_dir))
    (run_dir / "summary.txt").write_text(table + "\n")
    return table
