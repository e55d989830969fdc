"""The `wm` command: the stages of World Models for long runs.

    wm pipeline --preset quick                      everything, resumable, with a summary table
    wm collect --policy brownian --episodes 8       real driving data (notebook 01)
    wm train-vae --data DIR --out DIR               V (notebook 02)
    wm encode --data DIR --vae FILE                 every frame through V, for M
    wm train-rnn --data DIR --vae FILE --out DIR    M (notebook 03); --init M to fine-tune
    wm branches --data DIR --out DIR                the same real state, another steering (--branches of train-rnn)
    wm evolve --agent DIR --data DIR --out DIR      C by CMA-ES in the dream (notebook 04)
    wm evolve --agent DIR --where real --out DIR    C by CMA-ES on real episodes (the paper's setup)
    wm select --stage DIR --vae FILE --data DIR     evolve C a few times in the dream, keep reality's choice
    wm evaluate --agent DIR --episodes 100          real episodes, JSON result (notebook 05)
    wm iterate --run DIR                            one more sim2real iteration of a pipeline run
    wm dream-sweep --setting tau --values 0.5,1.0   C evolved in the dream at each value, dream vs real
    wm figures                                      the lessons' key figures into docs/figures/

Every subcommand prints one clear line and exits non-zero on bad input (a `WMError` or an OSError);
any other exception is a bug and shows its traceback. The commands that take --preset also take
`--set section.field=value` (repeatable) for any setting of the preset (`config.parse_settings`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wmlib.errors import WMError


def _int_from(low: int, what: str):
    """An argparse type: an integer >= `low` (`what` names it in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value
    return parse


_positive_int = _int_from(1, "positive")
_count = _int_from(0, "non-negative")


def cmd_collect(args) -> None:
    from wmlib.policies import POLICIES
    from wmlib.rollouts import collect

    if args.policy not in POLICIES:
        raise WMError(f"unknown policy {args.policy!r}; valid policies: {', '.join(POLICIES)}")
    kwargs = {"agent": args.agent} if args.agent else {}
    manifest = collect(args.policy, args.episodes, args.out, seed=args.seed, workers=args.workers,
                       max_steps=args.max_steps, mirror=args.mirror, fast=not args.stock, policy_kwargs=kwargs)
    print(json.dumps({"out": str(args.out), "episodes": len(manifest["episodes"]), "frames": manifest["frames"]}))


def _preset(args, flags: dict | None = None):
    """The preset of --preset with the --set settings, then the command's named flags (`flags`:
    {"section.field": value or None}, shorthands for --set that win over it) applied."""
    from wmlib.config import get_preset, parse_settings, with_settings

    preset = get_preset(args.preset)
    try:
        settings = parse_settings(args.set or [])
    except WMError as e:
        raise WMError(f"--set {e}") from None
    settings.update({k: v for k, v in (flags or {}).items() if v is not None})
    return with_settings(preset, settings)


def cmd_train_vae(args) -> None:
    from wmlib.files import read_jsonl
    from wmlib.paths import METRICS
    from wmlib.vae import train_vae

    cfg = _preset(args, {"vae.steps": args.steps}).vae
    train_vae(args.data, args.out, cfg)
    val = [r for r in read_jsonl(Path(args.out) / METRICS) if "val_pixel_mse" in r]
    if val:  # the quality bar: held-out MSE against always predicting the mean frame
        mse, base = val[-1]["val_pixel_mse"], val[-1]["val_mean_frame_mse"]
        print(json.dumps({"step": val[-1]["step"], "val_pixel_mse": mse, "mean_frame_mse": base, "ratio": mse / base}))


def cmd_encode(args) -> None:
    from wmlib.pipeline import encode

    vae_id = encode(Path(args.data), Path(args.vae), args.mirror)
    print(json.dumps({"data": args.data, "vae_id": vae_id}))


def cmd_train_rnn(args) -> None:
    from wmlib.data import load_encoded
    from wmlib.mdnrnn import train_mdnrnn
    from wmlib.pipeline import vae_id_of

    if args.reward_asymmetry is not None and args.reward_asymmetry <= 0:
        raise WMError(f"--reward-asymmetry must be positive, got {args.reward_asymmetry}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise WMError(f"--dropout must lie in [0, 1), got {args.dropout}")
    cfg = _preset(args, {"rnn.epochs": args.epochs, "rnn.reward_asymmetry": args.reward_asymmetry,
                         "rnn.dropout": args.dropout}).rnn
    vae_id = vae_id_of(args.vae)
    init = None
    if args.init:
        from wmlib.mdnrnn import load_mdnrnn

        init, header = load_mdnrnn(args.init)
        if header["extra"].get("vae_id") != vae_id:
            raise WMError(f"--init {args.init} was trained on latents of V {header['extra'].get('vae_id')}, "
                             f"not of --vae {args.vae} ({vae_id})")
    branches = None
    if args.branches:
        from wmlib.data import load_branches

        branches = load_branches(*args.branches)  # before the encodings: a wrong folder fails at once
    encoded = load_encoded(args.data, vae_id)
    pairs = None
    if branches is not None:
        from wmlib.data import branch_pairs
        from wmlib.vae import encode_frames, load_vae

        vae, _ = load_vae(args.vae)
        pairs = branch_pairs(encoded, branches, lambda f: encode_frames(vae, f), cfg.branch_warmup)
    train_mdnrnn(encoded, args.out, cfg, vae_id, init=init, branches=pairs)


def cmd_branches(args) -> None:
    from wmlib.rollouts import collect_branches

    print(json.dumps({"out": str(args.out), **collect_branches(
        args.data, args.out, per_episode=args.per_episode, horizon=args.horizon, seed=args.seed,
        first=args.first, last=args.last, workers=args.workers, fast=not args.stock, probes=args.probes,
        varied=not args.holds, **({"drivers": args.drivers} if args.drivers else {}))}))


def cmd_evolve(args) -> None:
    import numpy as np

    from wmlib.paths import PARTS
    from wmlib.pipeline import evolve_in_dream, evolve_in_real, vae_id_of

    if args.frame_budget is not None and args.frame_budget <= 0:
        raise WMError(f"--frame-budget must be a positive number of real frames, got {args.frame_budget}")
    cfg = _preset(args, {f"evolve.{k}": getattr(args, k) for k in (
        "optimizer", "generations", "popsize", "repeats", "sigma0", "tau", "frame_budget", "dream_dropout")}).evolve
    agent = Path(args.agent)
    x0 = None
    if args.init:
        from wmlib.controller import load_controller, to_flat

        init = Path(args.init)
        if init.is_dir():  # an agent folder: its C, which must have been made for the same V and M
            from wmlib.agent import part_path

            for part in ("V", "M"):
                if vae_id_of(part_path(init, part)) != vae_id_of(part_path(agent, part)):
                    raise WMError(f"--init {init}: its {PARTS[part]} differs from --agent {agent}'s; a C "
                                     f"only fits the V and M it was evolved with")
            init = part_path(init, "C")
        x0 = np.asarray(to_flat(load_controller(init)[0]))
    if args.where == "real":
        result = evolve_in_real(agent, Path(args.out), cfg, max_steps=args.max_steps, x0=x0, workers=args.workers,
                                fast=not args.stock, batch=args.batch, patience=args.patience or None)
    else:
        if not args.data:
            raise WMError("--data (an encoded collection to start dreams from) is needed with --where dream")
        from wmlib.agent import part_path

        result = evolve_in_dream(agent, Path(args.data), vae_id_of(part_path(agent, "V")), Path(args.out), cfg,
                                 x0=x0, workers=args.workers, fast=not args.stock)
    print(json.dumps({"best_return": result.best_return, "where": args.where, "generations": result.generations,
                      "controller": str(Path(args.out) / PARTS["C"])}))


def cmd_evaluate(args) -> None:
    from wmlib.evaluate import evaluate
    from wmlib.sim2real import write_media

    save_dir = Path(args.save) if args.save else None  # media need the episodes: kept beside the videos by default
    if save_dir is None and (args.video or args.filmstrip):
        save_dir = Path(args.video or ".") / "episodes"
    result = evaluate(args.agent, args.episodes, seed=args.seed, workers=args.workers, max_steps=args.max_steps,
                      fast=not args.stock, save_dir=save_dir, z_mode=args.z_mode, batch=args.batch)
    if save_dir:
        write_media(args.agent, save_dir, video_dir=args.video, filmstrip=args.filmstrip)
    for f in result["failed"]:
        print(f"episode seed {f['seed']} failed: {f['error']}", file=sys.stderr)
    if args.out:
        from wmlib.files import write_json

        write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("mean", "std", "episodes", "seed", "frames", "scores")}))


def cmd_select(args) -> None:
    from wmlib.paths import RunPaths
    from wmlib.pipeline import evolve_and_choose

    stage = RunPaths(args.stage)
    mdnrnns = [Path(p) for p in args.mdnrnn] if args.mdnrnn else [stage.mdnrnn]
    for mdnrnn in mdnrnns:
        if not mdnrnn.is_file():
            raise WMError(f"no M at {mdnrnn} (train one there first, wm train-rnn --out {stage.mdnrnn_dir}, or name "
                          "one with --mdnrnn)")
    cfg = _preset(args).evolve
    result = evolve_and_choose(stage, Path(args.vae), mdnrnns, Path(args.data), cfg, args.runs, args.episodes,
                               args.seed, max_steps=args.max_steps, workers=args.workers, fast=not args.stock,
                               pool=args.pool, incumbent=Path(args.incumbent) if args.incumbent else None,
                               screen=args.screen, finalists=args.finalists)
    print(json.dumps({"chosen": result["chosen"], "mdnrnn": result["mdnrnn"], "agent": str(stage.agent_dir),
                      "frames": result["frames"], "reference_dream_return": result["reference_dream_return"],
                      "real_means": {r["name"]: r["real_mean"] for r in result["candidates"]}}))


def cmd_iterate(args) -> None:
    from wmlib.config import preset_from_dict
    from wmlib.paths import RunPaths
    from wmlib.pipeline import Stages, format_summary, iterate, summary

    run = Path(args.run)
    preset = preset_from_dict(json.loads(RunPaths(run).config.read_text()))  # the settings the run started with
    stages = Stages(run)
    i = 1 + sum(1 for k in stages.done if k.startswith("iter_") and k.endswith("/evaluate"))
    iterate(run, i, preset, stages, args.workers, fast=not args.stock)
    print(format_summary(*summary(run)))


def cmd_pipeline(args) -> None:
    from wmlib.config import runs_dir
    from wmlib.pipeline import run_pipeline

    preset = _preset(args)
    print(run_pipeline(preset, args.run or runs_dir() / f"pipeline_{preset.name}", workers=args.workers,
                       fast=not args.stock))


def cmd_export(args) -> None:
    from wmlib.pipeline import export_agent

    print(json.dumps({"out": str(export_agent(args.run, args.out))}))


def cmd_figures(args) -> None:
    from wmlib.figures import render_all

    written = render_all(args.out, args.agent, args.data, seed=args.seed)
    print(json.dumps({"out": str(args.out), "figures": [p.name for p in written]}))


def cmd_imitate(args) -> None:
    from wmlib.data import episode_files, load_episode
    from wmlib.files import write_json
    from wmlib.imitation import imitation_bound

    files = [p for p in episode_files(args.data) if p.name.startswith("heuristic_")][:args.fit_episodes]
    if not files:
        raise WMError(f"--data {args.data} holds no heuristic episodes (heuristic_*.npz) to fit C to")
    result = imitation_bound(args.agent, [load_episode(p) for p in files], args.out, rounds=args.rounds,
                             episodes_per_round=args.episodes, seed=args.seed, workers=args.workers)
    write_json(Path(args.out) / "imitation.json", result)
    print(json.dumps({"out": str(args.out), "frames": result["frames"], "rounds": result["rounds"]}))


def cmd_fidelity(args) -> None:
    from wmlib.fidelity import fidelity_report
    from wmlib.paths import fidelity_dir

    try:
        horizons = sorted({int(h) for h in args.horizons.split(",")})
    except ValueError:
        raise WMError(f"--horizons must be comma-separated positive integers, got {args.horizons!r}") from None
    if horizons[0] < 1:
        raise WMError(f"--horizons must be comma-separated positive integers, got {args.horizons!r}")
    out = Path(args.out) if args.out else fidelity_dir(args.evolve)
    report = fidelity_report(args.agent, args.data, args.evolve, _preset(args).evolve, out,
                             controllers=args.controllers, real_episodes=args.real_episodes,
                             dream_rollouts=args.dream_rollouts, horizons=horizons, real_seed=args.real_seed,
                             workers=args.workers, fast=not args.stock, holds=args.holds)
    bends = report["bends"]
    print(json.dumps({"out": str(out), "spearman": report["rank"]["spearman"],
                      "bend": {name: {kind: v if kind == "geometry" else v["bend"] for kind, v in parts.items()}
                               for name, parts in bends.items()},
                      "road_seen": {name: {kind: v["road_seen"] for kind, v in parts.items() if kind != "geometry"}
                                    for name, parts in bends.items()},
                      "steering_response_dream_over_real": report["steering"]["ratio"],
                      **({"holds": report["holds"]} if "holds" in report else {})}))


def cmd_dream_sweep(args) -> None:
    from wmlib.config import parse_value
    from wmlib.pipeline import dream_sweep

    try:
        values = [parse_value(f"evolve.{args.setting}", t.strip()) for t in args.values.split(",")]
    except WMError as e:
        raise WMError(f"--setting/--values: {e}") from None
    cfg = _preset(args, {f"evolve.{k}": getattr(args, k) for k in ("generations", "popsize", "repeats")}).evolve
    result = dream_sweep(Path(args.agent), Path(args.data), Path(args.out), cfg, args.setting, values, args.episodes,
                         runs=args.runs, seed=args.seed, max_steps=args.max_steps, workers=args.workers,
                         fast=not args.stock)
    print(json.dumps({k: result[k] for k in ("setting", "value", "run_seed", "dream_mean", "real_mean", "real_std")}))


def backend_args(p) -> None:
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="run episodes on local processes or as Ray tasks (needs `uv sync --extra ray`)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster: auto, HOST:PORT, or omitted to start a local Ray instance")


def build_parser() -> argparse.ArgumentParser:
    from wmlib.config import PRESETS, SELECTION_SEED, TRAINING_SEED

    parser = argparse.ArgumentParser(prog="wm", description="World Models (Ha & Schmidhuber, 2018) on CarRacing-v3")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="drive real CarRacing-v3 episodes with a policy and save them")
    p.add_argument("--policy", default="brownian", help="random, brownian, heuristic, recovery, weave or controller")
    p.add_argument("--episodes", type=_positive_int, default=8)
    p.add_argument("--max-steps", type=_positive_int, default=1000)
    p.add_argument("--workers", type=_positive_int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--seed", type=int, default=TRAINING_SEED,
                   help=f"episode i runs on env seed SEED+i (default {TRAINING_SEED}, the start of the training "
                        "range; seeds 0..99999 are the test range)")
    p.add_argument("--out", default="runs/data", help="collection folder (created; re-running resumes)")
    p.add_argument("--mirror", action="store_true", help="also save each episode's left-right mirror image")
    p.add_argument("--stock", action="store_true", help="use the stock Gymnasium renderer, not the fast one")
    p.add_argument("--agent", default=None, help="agent folder (V, M, C checkpoints) for --policy controller")
    backend_args(p)
    p.set_defaults(func=cmd_collect)

    def settings_arg(p):
        p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="change any setting of the preset, e.g. evolve.generations=10 or "
                            "collect.policies=brownian,recovery (repeatable; named options win)")

    def preset_arg(p):
        p.add_argument("--preset", default=None, help=f"{', '.join(PRESETS)} (default: $WM_PRESET or quick)")
        settings_arg(p)

    def env_args(p):
        p.add_argument("--workers", type=_positive_int, default=None, help="worker processes (default: all cores)")
        p.add_argument("--stock", action="store_true", help="use the stock Gymnasium renderer, not the fast one")
        backend_args(p)

    p = sub.add_parser("train-vae", help="train V on a collection (resumes from --out)")
    p.add_argument("--data", required=True, help="collection folder")
    p.add_argument("--out", required=True, help="run folder for vae.eqx and metrics")
    p.add_argument("--steps", type=_positive_int, default=None, help="override the preset's training steps")
    preset_arg(p)
    p.set_defaults(func=cmd_train_vae)

    p = sub.add_parser("encode", help="encode every episode of a collection with V (resumable)")
    p.add_argument("--data", required=True)
    p.add_argument("--vae", required=True, help="V checkpoint (vae.eqx)")
    p.add_argument("--mirror", action="store_true", help="also encode the mirror image of every episode")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("train-rnn", help="train M on the encodings of a collection (resumes from --out)")
    p.add_argument("--data", required=True)
    p.add_argument("--vae", required=True, help="the V whose encodings to use")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=_positive_int, default=None)
    p.add_argument("--init", default=None, help="mdnrnn.eqx to fine-tune (trained on the same V)")
    p.add_argument("--reward-asymmetry", type=float, default=None,
                   help="weight of reward over-prediction in M's loss (default 1; >1 makes M pessimistic)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout on M's LSTM inputs and state while training (Dropout's Dream Land: 0.05)")
    p.add_argument("--branches", nargs="+", default=None,
                   help="folders of branches of the collection (`wm branches`): M also learns what the wheel does "
                        "(weight rnn.w_branch)")
    preset_arg(p)
    p.set_defaults(func=cmd_train_rnn)

    p = sub.add_parser("branches", help="replay recorded episodes to a step, then steer otherwise: pairs of real "
                                        "futures that differ only in the steering, for train-rnn --branches")
    p.add_argument("--data", required=True, help="collection with episodes of --drivers")
    p.add_argument("--out", required=True, help="branch folder (created; re-running resumes)")
    p.add_argument("--per-episode", type=_positive_int, default=3, help="branch points per recorded episode")
    p.add_argument("--horizon", type=_positive_int, default=24, help="steps of the other steering after a branch point")
    p.add_argument("--seed", type=int, default=0, help="seed of the branch points and held steers")
    p.add_argument("--drivers", nargs="+", default=None,
                   help="branch the episodes of these policies (default: recovery weave; controller: an agent's own, "
                        "where it fails)")
    p.add_argument("--first", type=_positive_int, default=60, help="branch points lie in [first, last)")
    p.add_argument("--last", type=_positive_int, default=420, help="branch points lie in [first, last)")
    p.add_argument("--holds", action="store_true",
                   help="one held steer per branch, gas as recorded (the hold test's branches); default: the wheel "
                        "swings between 1 to 8 held steers and half the branches floor the gas")
    p.add_argument("--probes", action="store_true",
                   help="branch only the steering report's probe episodes (held out from training: for the hold test)")
    p.add_argument("--workers", type=_positive_int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--stock", action="store_true", help="use the stock Gymnasium renderer, not the fast one")
    p.set_defaults(func=cmd_branches)

    p = sub.add_parser("evolve", help="evolve C with CMA-ES in M's dream (resumes from --out)")
    p.add_argument("--agent", required=True, help="folder with vae.eqx and mdnrnn.eqx")
    p.add_argument("--where", choices=["dream", "real"], default="dream",
                   help="score candidates in M's dream (default) or on real CarRacing episodes")
    p.add_argument("--data", default=None, help="encoded collection the dreams start from (--where dream)")
    p.add_argument("--out", required=True)
    p.add_argument("--init", default=None,
                   help="controller.eqx, or an agent folder with the same V and M, whose C is the search's start")
    p.add_argument("--sigma0", type=float, default=None, help="CMA-ES initial step size (preset: 0.1)")
    p.add_argument("--repeats", type=_positive_int, default=None, help="episodes (or dreams) per candidate")
    p.add_argument("--frame-budget", type=int, default=None,
                   help="--where real: stop once this many real frames are used")
    p.add_argument("--max-steps", type=_positive_int, default=1000, help="real episode length (--where real)")
    p.add_argument("--batch", type=_positive_int, default=16, help="real episodes each worker drives in lockstep")
    p.add_argument("--patience", type=int, default=100,
                   help="--where real: end an episode after this many steps without a new tile (0: never)")
    p.add_argument("--optimizer", choices=["pycma", "evosax"], default=None)
    p.add_argument("--generations", type=_positive_int, default=None)
    p.add_argument("--popsize", type=int, default=None)
    p.add_argument("--tau", type=float, default=None, help="dream temperature")
    p.add_argument("--dream-dropout", type=float, default=None,
                   help="a new dropout mask on M per dream episode (Dropout's Dream Land: 0.1)")
    preset_arg(p)
    env_args(p)
    p.set_defaults(func=cmd_evolve)

    p = sub.add_parser("evaluate", help="run an agent on real episodes; prints a JSON line")
    p.add_argument("--agent", required=True, help="agent folder (vae.eqx, mdnrnn.eqx, controller.eqx), or a run "
                                                  "folder for its final agent (e.g. data/pretrained)")
    p.add_argument("--episodes", type=_positive_int, default=100)
    p.add_argument("--seed", type=int, default=0, help="episode i runs on env seed SEED+i")
    p.add_argument("--max-steps", type=_positive_int, default=1000)
    p.add_argument("--video", default=None, help="folder for one mp4 per episode (real | V | dream)")
    p.add_argument("--filmstrip", action="store_true", help="PNG strip around each episode's worst moment")
    p.add_argument("--save", default=None, help="folder to keep the episodes in")
    p.add_argument("--batch", type=_positive_int, default=16, help="episodes each worker drives in lockstep")
    p.add_argument("--z-mode", choices=["sample", "mean"], default="sample",
                   help="C sees a draw from V's posterior (default, as in the dream) or V's mean")
    p.add_argument("--out", default=None, help="also write the whole result (every episode) to this JSON file")
    env_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("select", help="evolve C several times in M's dream and keep the one reality prefers "
                                      "(on selection-range tracks): a stage's agent")
    p.add_argument("--stage", required=True, help="stage folder (e.g. RUN/iter_2): gets evolve/seed_S/ per evolution, "
                                                  "evolve/selection.json and agent/")
    p.add_argument("--vae", required=True, help="the V whose latents M was trained on")
    p.add_argument("--mdnrnn", nargs="+", default=None,
                   help="the M to dream in (default: the stage's mdnrnn/mdnrnn.eqx); given several (e.g. trained "
                        "with other seeds), --runs evolutions in each one's dream (in STAGE/m_K/, K its place in "
                        "the list), and reality chooses among all their candidates")
    p.add_argument("--data", required=True, help="encoded collection the dreams start from")
    p.add_argument("--runs", type=_positive_int, default=2, help="evolutions (seeds evolve.seed, evolve.seed+1, ...)")
    p.add_argument("--episodes", type=_positive_int, default=64, help="selection tracks per candidate C")
    p.add_argument("--pool", type=_count, default=0,
                   help="also the dream's POOL best earlier search means of the evolutions (every generation "
                        "scored in 256 dreams) as candidates (default 0: the final means only)")
    p.add_argument("--screen", type=_count, default=0,
                   help="every candidate first drives only the first SCREEN of the --episodes tracks, and the "
                        "--finalists best of each M's drive the rest (default 0: every candidate drives them all)")
    p.add_argument("--finalists", type=_positive_int, default=1,
                   help="with --screen: candidates of each M that go on to all --episodes tracks (default 1)")
    p.add_argument("--incumbent", default=None,
                   help="an agent folder with the same V and M (one of them; e.g. an earlier round's): its C is a "
                        "candidate too, so the stage hands on a new C only if reality prefers it")
    p.add_argument("--seed", type=int, default=SELECTION_SEED,
                   help=f"episode i runs on env seed SEED+i (default {SELECTION_SEED}: the selection range)")
    p.add_argument("--max-steps", type=_positive_int, default=1000)
    preset_arg(p)
    env_args(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("iterate", help="one more sim2real iteration of a pipeline run")
    p.add_argument("--run", required=True)
    env_args(p)
    p.set_defaults(func=cmd_iterate)

    from wmlib.config import PRETRAINED_DIR, PROJECT_ROOT, SAMPLE_DIR

    p = sub.add_parser("figures", help="render the lessons' key figures from an agent (default: the shipped one)")
    p.add_argument("--agent", default=str(PRETRAINED_DIR),
                   help="run folder laid out like data/pretrained: agent, logs, eval.json and the dream sweeps")
    p.add_argument("--data", default=str(SAMPLE_DIR), help="collection of episodes to picture (one per policy)")
    p.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "figures"),
                   help="folder for the PNGs (default: docs/figures)")
    p.add_argument("--seed", type=int, default=0, help="env seed of the real episode in the sim2real figures")
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("imitate", help="the imitation bound: a linear C fitted to the heuristic driver (+ DAgger)")
    p.add_argument("--agent", required=True, help="folder with the vae.eqx and mdnrnn.eqx to fit C on")
    p.add_argument("--data", required=True, help="collection with heuristic episodes (heuristic_*.npz)")
    p.add_argument("--out", required=True, help="agent folder to write (V, M and the fitted C)")
    p.add_argument("--fit-episodes", type=_positive_int, default=40, help="heuristic episodes to fit on first")
    p.add_argument("--rounds", type=int, default=2, help="DAgger rounds (the agent drives, the heuristic labels)")
    p.add_argument("--episodes", type=_positive_int, default=16, help="real episodes per DAgger round")
    p.add_argument("--seed", type=int, default=TRAINING_SEED + 900_000,
                   help="round r, episode i drives env seed SEED + 1000 r + i (training range)")
    env_args(p)
    p.set_defaults(func=cmd_imitate)

    from wmlib.config import SELECTION_SEED

    p = sub.add_parser("fidelity", help="dream fidelity: rank agreement with reality, road bends, reward calibration")
    p.add_argument("--agent", required=True, help="folder with the vae.eqx and mdnrnn.eqx the evolution dreamed in")
    p.add_argument("--data", required=True, help="collection encoded by that V (dream starts, real drivers' episodes)")
    p.add_argument("--evolve", required=True, help="evolution run folder (history.npz: its CMA-ES search means)")
    p.add_argument("--controllers", type=_positive_int, default=20, help="search means spread over the run to compare")
    p.add_argument("--real-episodes", type=_positive_int, default=8, help="real episodes per controller")
    p.add_argument("--dream-rollouts", type=_positive_int, default=64, help="dreams per controller")
    p.add_argument("--horizons", default="50,100,200,1000", help="dream lengths to score at, comma-separated")
    p.add_argument("--real-seed", type=int, default=SELECTION_SEED,
                   help=f"real episode i runs on env seed REAL_SEED+i (default {SELECTION_SEED}, selection range)")
    p.add_argument("--out", default=None, help="folder for fidelity.json and figures (default EVOLVE/fidelity)")
    p.add_argument("--holds", default=None, help="branches that hold the wheel on episodes M did not train on "
                                                  "(`wm branches --probes --holds`): adds the hold test")
    preset_arg(p)
    env_args(p)
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("dream-sweep", help="the paper's experiments with C trained in the dream: evolve C at each "
                                           "value of one setting (tau, inputs), score it in the dream and in reality")
    p.add_argument("--agent", required=True, help="folder with the vae.eqx and mdnrnn.eqx to dream in")
    p.add_argument("--data", required=True, help="collection encoded by that V (dream starts)")
    p.add_argument("--out", required=True, help="folder for one evolution per value and run, and SETTING_sweep.json")
    p.add_argument("--setting", required=True, help="an evolve setting: tau (the temperature table) or inputs "
                                                    "(z: V only, zh: V and M)")
    p.add_argument("--values", required=True, help="its values, comma-separated, e.g. 0.5,1.0,1.15,1.3 or z,zh")
    p.add_argument("--runs", type=_positive_int, default=1, help="evolutions per value (seeds SEED, SEED+1, ...)")
    p.add_argument("--generations", type=_positive_int, default=None,
                   help="generations per evolution (default: preset)")
    p.add_argument("--popsize", type=_positive_int, default=None, help="CMA-ES population (default: preset)")
    p.add_argument("--repeats", type=_positive_int, default=None, help="dreams per candidate (default: preset)")
    p.add_argument("--episodes", type=_positive_int, default=32, help="real episodes per evolved C")
    p.add_argument("--seed", type=int, default=0, help="real episode i runs on env seed SEED+i (default 0, test range)")
    p.add_argument("--max-steps", type=_positive_int, default=1000, help="steps per real episode")
    preset_arg(p)
    env_args(p)
    p.set_defaults(func=cmd_dream_sweep)

    p = sub.add_parser("export", help="copy a pipeline run's final agent and its logs into a folder laid out as a "
                                      "run (data/pretrained)")
    p.add_argument("--run", required=True, help="pipeline run folder")
    p.add_argument("--out", required=True, help="folder to write, e.g. data/pretrained")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("pipeline", help="the whole method, resumable, with a summary")
    p.add_argument("--preset", default="quick", help=f"{', '.join(PRESETS)} (default quick; results: the shipped "
                                                     "agent)")
    p.add_argument("--run", default=None, help="run folder (default runs/pipeline_PRESET)")
    settings_arg(p)
    env_args(p)
    p.set_defaults(func=cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    from wmlib.fast.memory import reuse_freed_memory

    reuse_freed_memory()  # first, before JAX starts its threads (see why in its docstring)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "backend", "local") == "ray":
            from wmlib.rollouts import use_backend

            use_backend("ray", args.ray_address)
        args.func(args)
    except KeyboardInterrupt:
        print(f"wm {args.command}: interrupted; finished work is saved, run the same command to resume",
              file=sys.stderr)
        return 130
    except (WMError, OSError) as e:  # a user error: one line; anything else is a bug, shown with its traceback
        print(f"wm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
