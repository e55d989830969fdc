"""The lessons' key figures, as functions: the notebooks call them, and `wm figures` renders them from
the shipped artifacts into docs/figures/ so a reader who cannot run code still sees the results.

Every function here returns a matplotlib Figure built from plain arrays and metric records; nothing
trains or touches the environment except `render_all`, which gathers the inputs (the shipped V, M, C,
their logs, the sample episodes and one real episode of the agent) and writes the PNGs atomically.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np

# The files `wm figures` writes, in lesson order; the notebooks' markdown embeds each of them.
FIGURES = {
    "01_policies.png": "the four collection policies, filmstrips of one sample episode each",
    "02_vae_curves.png": "V's training curves and the held-out quality bar",
    "02_reconstructions.png": "held-out frames | V's reconstruction | error",
    "02_kl_per_dim.png": "mean KL of each latent dimension",
    "02_latent_sweep.png": "the six most informative dimensions swept from -3 to +3",
    "03_mdnrnn_curves.png": "M's training curves and held-out reward/done metrics",
    "03_real_vs_dream.png": "real frames vs M's dream with the same actions",
    "03_temperature.png": "one dream start at three temperatures",
    "04_fitness.png": "CMA-ES in the dream: best and mean return per generation",
    "04_dream_rollout.png": "the shipped controller driving in the dream",
    "04_temperature_table.png": "C evolved at each temperature: dream vs real score",
    "04_inputs_table.png": "C on z alone (V only) vs on z and h (V and M), evolved in the dream: dream vs real",
    "04_selection.png": "the candidates for C: dream return vs real score on selection tracks; reality picks",
    "05_scores.png": "the shipped agent's real scores over 100 episodes",
    "05_worst_moment.png": "real / V / M around the worst moment of a real episode",
    "05_reward_prediction.png": "real reward and done vs M's predictions along a real episode",
    "05_track.png": "the car's path on the track, off-road steps marked",
}


def _plt():
    """pyplot; a process that has not chosen a backend (`wm figures`) draws off-screen with Agg,
    a notebook keeps its own."""
    import matplotlib

    if not os.environ.get("MPLBACKEND") and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def picture(image: np.ndarray, title: str = "", width: float = 12.0):
    """An image array shown at its own aspect ratio, axes off, with an optional title."""
    plt = _plt()
    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(width, width * h / w + (0.4 if title else 0.0)))
    ax.imshow(image)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def policy_filmstrips(episodes: dict):
    """One filmstrip row per policy: {name: Episode}."""
    from wmlib.viz import filmstrip

    plt = _plt()
    fig, axes = plt.subplots(len(episodes), 1, figsize=(12, 1.6 * len(episodes)), squeeze=False)
    for ax, (name, ep) in zip(axes[:, 0], episodes.items()):
        ax.imshow(filmstrip(ep.frames, n=10))
        ax.set_title(f"{name} (return {ep.total_reward:.0f} over {len(ep)} steps)", loc="left", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig


def vae_curves(records: list[dict]):
    """V's metrics.jsonl records -> reconstruction, KL (with the free-bits line) and held-out MSE."""
    plt = _plt()
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3))
    axes[0].plot([r["step"] for r in train], [r["recon"] for r in train], label="train")
    axes[0].plot([r["step"] for r in val], [r["val_recon"] for r in val], "o-", label="held-out")
    axes[0].set_title("reconstruction (sum of squared errors per frame)")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["kl"] for r in train])
    axes[1].axhline(0.5 * 32, color="k", ls="--", lw=0.8, label="free bits: 16 nats")
    axes[1].set_title("KL per frame")
    axes[1].legend()
    axes[2].plot([r["step"] for r in val], [r["val_pixel_mse"] for r in val], "o-", label="V")
    axes[2].plot([r["step"] for r in val], [r["val_mean_frame_mse"] for r in val], "--", label="mean frame")
    axes[2].set_yscale("log")
    axes[2].set_title("held-out per-pixel MSE")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def kl_bars(kl: np.ndarray):
    """Mean KL per latent dimension, sorted, labelled with the dimension's index."""
    plt = _plt()
    order = np.argsort(-kl)
    fig, ax = plt.subplots(figsize=(10, 2.5))
    ax.bar(range(len(kl)), kl[order])
    ax.set_xticks(range(len(kl)), [str(d) for d in order], fontsize=7)
    ax.set_xlabel("latent dimension (sorted)")
    ax.set_ylabel("mean KL")
    fig.tight_layout()
    return fig


def mdnrnn_curves(records: list[dict]):
    """M's metrics.jsonl records -> z NLL, reward and done losses, held-out reward/done metrics."""
    plt = _plt()
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_nll_per_step" in r]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3))
    for ax, (key, title) in zip(axes[:3], [("nll", "z NLL per dim"), ("reward_loss", "reward loss"),
                                           ("done_loss", "done BCE")]):
        ax.plot([r["step"] for r in train], [r[key] for r in train])
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[3].plot([r["step"] for r in val], [r["val_reward_corr"] for r in val], "o-", label="reward correlation")
    axes[3].plot([r["step"] for r in val], [r["val_done_recall"] for r in val], "s-", label="done recall")
    axes[3].plot([r["step"] for r in val], [r["val_done_precision"] for r in val], "^-", label="done precision")
    axes[3].set_ylim(0, 1.05)
    axes[3].set_title("held-out episodes")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    return fig


def reward_prediction(rewards: np.ndarray, dones: np.ndarray, pred: dict, title: str = ""):
    """Real reward and episode end along an episode against M's predictions (`predict_along_episode`)."""
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(10, 4), sharex=True)
    axes[0].plot(rewards, lw=1, label="real")
    axes[0].plot(pred["reward_pred"], lw=1, label="M")
    axes[0].set_ylabel("reward")
    axes[0].legend(fontsize=8)
    if title:
        axes[0].set_title(title, fontsize=10)
    axes[1].plot(dones, lw=1, label="real end")
    axes[1].plot(pred["done_prob"], lw=1, label="M: P(done)")
    axes[1].set_ylabel("done")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def real_vs_dream(real_frames: np.ndarray, dream: dict, real_rewards: np.ndarray):
    """Real frames over dreamed frames (same actions, `viz.real_vs_dream`), and both reward traces."""
    from wmlib.viz import filmstrip, vstack

    plt = _plt()
    fig = plt.figure(figsize=(13, 6))
    ax = fig.add_subplot(2, 1, 1)
    ax.imshow(vstack([filmstrip(real_frames, n=10), filmstrip(dream["frames"], n=10)], pad=6))
    ax.set_title("real (top) vs dream with the same actions (bottom)")
    ax.axis("off")
    ax = fig.add_subplot(2, 1, 2)
    ax.plot(real_rewards, label="real reward")
    ax.plot(dream["reward"], label="dreamed reward")
    ax.set_xlabel("steps after the start")
    ax.legend()
    fig.tight_layout()
    return fig


def fitness(records: list[dict], title: str):
    """Evolution log records -> best and mean (+- std) return per generation, and any real checks."""
    plt = _plt()
    g = [r["generation"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(g, [r["best"] for r in records], label="best of generation")
    ax.plot(g, [r["mean"] for r in records], label="population mean")
    ax.fill_between(g, [r["mean"] - r["std"] for r in records], [r["mean"] + r["std"] for r in records], alpha=0.2)
    real = [r for r in records if "real_mean" in r]
    if real:
        ax.errorbar([r["generation"] for r in real], [r["real_mean"] for r in real],
                    [r["real_std"] for r in real], fmt="o", color="k", label="best, in the REAL env")
    ax.set_xlabel("generation")
    ax.set_ylabel("return")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


SWEEP_AXES = {"tau": ("temperature tau the controller was evolved at", lambda v: f"{v:g}"),
              "inputs": ("what C reads", lambda v: {"z": "z (V only)", "zh": "z and h (V and M)"}[v])}


def sweep_table(sweep: dict):
    """A dream sweep (`pipeline.dream_sweep`, SETTING_sweep.json): for the Cs evolved at each value, the
    dream return (mean over runs, with their mean std) and the real return (every real episode of every
    run pooled: mean +- std), each run's real mean as a dot."""
    plt = _plt()
    label, tick = SWEEP_AXES[sweep["setting"]]
    values = list(dict.fromkeys(sweep["value"]))
    fig, ax = plt.subplots(figsize=(6, 4.2))
    runs = sorted(set(sweep["run_seed"]))
    for i, v in enumerate(values):
        rows = [j for j, u in enumerate(sweep["value"]) if u == v]
        real = np.concatenate([sweep["scores"][j] for j in rows])
        ax.bar(i - 0.2, np.mean([sweep["dream_mean"][j] for j in rows]), 0.4,
               yerr=np.mean([sweep["dream_std"][j] for j in rows]), color="C0",
               label="in the dream (its own kind)" if i == 0 else None)
        ax.bar(i + 0.2, real.mean(), 0.4, yerr=real.std(), color="C1",
               label=f"real, {sweep['episodes']} episodes per run (env seeds {sweep['seed']}.."
                     f"{sweep['seed'] + sweep['episodes'] - 1})" if i == 0 else None)
        ax.plot([i + 0.2] * len(rows), [sweep["real_mean"][j] for j in rows], "k.",
                label=f"each run's real mean ({len(runs)} evolution seeds)" if i == 0 and len(runs) > 1 else None)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xticks(range(len(values)), [tick(v) for v in values])
    ax.set_xlabel(label)
    ax.set_ylabel("return (mean +- std)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22))  # below: bars stay readable
    fig.tight_layout()
    return fig


def selection(result: dict):
    """A choice by reality (`pipeline.choose_by_reality`, selection.json): each candidate C's dream return
    against its mean real score on the selection tracks (+- its standard error), the chosen one ringed. A
    candidate the dream did not score (an earlier round's C, `wm select --incumbent`) is a dashed line at its
    real mean, in a band of +- its standard error."""
    plt = _plt()
    se = lambda r: r["real_std"] / np.sqrt(len(r["scores"]))  # noqa: E731
    rows = [r for r in result["candidates"] if np.isfinite(r["dream_return"])]
    if not rows:
        raise ValueError("selection: no candidate has a dream return (chosen without `wm select --pool`?)")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar([r["dream_return"] for r in rows], [r["real_mean"] for r in rows], [se(r) for r in rows], fmt="o",
                label="a candidate C")
    for r in rows:
        ax.annotate(r["name"], (r["dream_return"], r["real_mean"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
        if r["name"] == result["chosen"]:
            ax.scatter([r["dream_return"]], [r["real_mean"]], s=200, facecolors="none", edgecolors="k",
                       label="chosen by reality")
    for r in (r for r in result["candidates"] if not np.isfinite(r["dream_return"])):
        chosen = " (chosen by reality)" if r["name"] == result["chosen"] else ""
        ax.axhline(r["real_mean"], color="k" if chosen else "0.5", ls="--", lw=1,
                   label=f"{r['name']}, not scored in this dream{chosen}")
        ax.axhspan(r["real_mean"] - se(r), r["real_mean"] + se(r), color="0.5", alpha=0.15)
    ax.set_xlabel("dream return (mean over the dreams it was scored in)")
    ax.set_ylabel(f"real, {result['episodes']} selection tracks (mean +- s.e.)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def score_histogram(result: dict, title: str = ""):
    """An evaluation result (`evaluate` / eval.json) -> histogram of its real episode scores."""
    plt = _plt()
    scores = np.asarray(result["scores"])
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(scores, bins=20)
    ax.axvline(result["mean"], color="k", lw=1)
    ax.set_xlabel("real episode return")
    ax.set_ylabel("episodes")
    ax.set_title(title or f"{len(scores)} episodes (env seeds {result['seed']}..{result['seed'] + len(scores) - 1}): "
                          f"{result['mean']:.1f} +- {result['std']:.1f}", fontsize=10)
    fig.tight_layout()
    return fig


def tracks(episodes: list):
    """Each episode's car path over its track (`ep.info["car_xy"]`), off-road steps in red."""
    from wmlib.env import offroad_steps, track_of_seed

    plt = _plt()
    fig, axes = plt.subplots(1, len(episodes), figsize=(4 * len(episodes), 4), squeeze=False)
    for ax, ep in zip(axes[0], episodes):
        track = track_of_seed(ep.seed)
        off = offroad_steps(ep.info["car_xy"], track)
        ax.plot(*np.vstack([track, track[:1]]).T, color="grey", lw=6, alpha=0.4)
        ax.plot(*ep.info["car_xy"].T, lw=1)
        ax.scatter(*ep.info["car_xy"][off].T, s=4, color="red", label="off road")
        ax.set_title(f"seed {ep.seed}: {ep.total_reward:.0f}, {off.mean():.0%} off road", fontsize=9)
        ax.set_aspect("equal")
        ax.axis("off")
    fig.tight_layout()
    return fig


def save(fig, path: str | os.PathLike, dpi: int = 80) -> Path:
    """Write a figure as PNG atomically (a half-written picture never replaces a good one); close it."""
    from wmlib.files import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _plt().close(fig)
    with atomic_write(path) as f:
        f.write(buf.getvalue())
    return Path(path)


def render_all(out_dir: str | os.PathLike, run_dir: str | os.PathLike, data_dir: str | os.PathLike,
               seed: int = 0) -> list[Path]:
    """Render every figure of `FIGURES` into `out_dir` from a run folder laid out like data/pretrained
    (`paths.RunPaths`: its agent, the metrics of V, M and the evolution, eval.json, and the dream sweeps
    tau_sweep.json and inputs_sweep.json beside them), a collection of episodes (data/sample) and one
    real episode of the agent on env seed `seed`."""
    import jax

    from wmlib.agent import Agent
    from wmlib.data import episode_files, load_episode
    from wmlib.dream import DreamParams, make_start_bank, rollout_trajectory
    from wmlib.files import read_jsonl
    from wmlib.paths import RunPaths
    from wmlib.pipeline import sweep_file
    from wmlib.rollouts import EpisodeSpec, run_episode
    from wmlib.sim2real import episode_panels, predict_along_episode, worst_moment
    from wmlib import viz
    from wmlib.viz import filmstrip, filmstrip_rows, latent_sweep, recon_panel, vstack
    from wmlib.vae import decode_latents, encode_frames, reconstruct

    out, run, data_dir = Path(out_dir), RunPaths(run_dir), Path(data_dir)
    sweeps = {setting: run.root / sweep_file(setting) for setting in ("tau", "inputs")}
    for path in (run.vae_metrics, run.mdnrnn_metrics, run.evolve_metrics, run.selection, run.eval, *sweeps.values()):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the run folder must be laid out like data/pretrained "
                                    "(agent/, the metrics.jsonl of vae/, mdnrnn/ and evolve/, evolve/selection.json, "
                                    "eval.json, tau_sweep.json and inputs_sweep.json)")
    files = episode_files(data_dir)
    if not files:
        raise FileNotFoundError(f"no episodes (*.npz) in {data_dir}: the data must be a collection like data/sample")
    agent = Agent.load(run.agent_dir)
    vae, mdnrnn = agent.vae, agent.mdnrnn
    decode = lambda zs: decode_latents(vae, zs)  # noqa: E731
    episodes = {ep.policy: ep for ep in map(load_episode, files)}
    written = []

    def put(name, fig):
        written.append(save(fig, out / name))

    def records(path, stage):
        return [r for r in read_jsonl(path) if r.get("stage") == stage]

    put("01_policies.png", policy_filmstrips(episodes))

    frames = np.concatenate([ep.frames for ep in episodes.values()])
    picks = np.linspace(0, len(frames) - 1, 4).astype(int)
    put("02_vae_curves.png", vae_curves(records(run.vae_metrics, "vae")))
    put("02_reconstructions.png", picture(vstack([recon_panel(f, r) for f, r in
                                                  zip(frames[picks], reconstruct(vae, frames[picks]))]), width=9))
    mu, logvar = encode_frames(vae, frames)  # every sample frame, once; split per episode below
    cuts = np.cumsum([len(e) for e in episodes.values()])[:-1]
    encoded = dict(zip(episodes, zip(np.split(mu, cuts), np.split(logvar, cuts))))
    kl = viz.kl_per_dim(mu, logvar)
    put("02_kl_per_dim.png", kl_bars(kl))
    put("02_latent_sweep.png", picture(latent_sweep(decode, mu[len(mu) // 2], [int(d) for d in np.argsort(-kl)[:6]]),
                                       "each row: one dimension at -3 ... +3", width=8))

    put("03_mdnrnn_curves.png", mdnrnn_curves(records(run.mdnrnn_metrics, "mdnrnn")))
    name = "heuristic" if "heuristic" in episodes else next(iter(episodes))  # a driver that stays on the road
    ep, ep_mu = episodes[name], encoded[name][0]
    start = min(60, len(ep) - 2)
    steps = min(80, len(ep) - start - 1)
    dream = viz.real_vs_dream(mdnrnn, decode, ep_mu, ep.actions, start, steps, jax.random.PRNGKey(2))
    put("03_real_vs_dream.png", real_vs_dream(ep.frames[start:start + steps + 1], dream,
                                              ep.rewards[start:start + steps]))
    rows = [filmstrip(viz.real_vs_dream(mdnrnn, decode, ep_mu, ep.actions, start, 40, jax.random.PRNGKey(1),
                                        tau=tau)["frames"], n=8) for tau in (0.3, 1.0, 1.6)]
    put("03_temperature.png", picture(vstack(rows, pad=6), "tau = 0.3 (top), 1.0, 1.6 (bottom)"))

    put("04_fitness.png", fitness(records(run.evolve_metrics, "evolve"), "evolution of the shipped controller"))
    bank = make_start_bank([m for m, _ in encoded.values()], [lv for _, lv in encoded.values()],
                           [e.actions for e in episodes.values()])
    ret, traj = rollout_trajectory(jax.random.PRNGKey(7), agent.controller, DreamParams(mdnrnn, bank), 200)
    put("04_dream_rollout.png", picture(filmstrip(decode(np.asarray(traj.z)), n=10),
                                        f"the shipped controller in M's dream: return {float(ret):.0f} "
                                        f"over 200 steps"))

    put("04_temperature_table.png", sweep_table(json.loads(sweeps["tau"].read_text())))
    put("04_inputs_table.png", sweep_table(json.loads(sweeps["inputs"].read_text())))
    put("04_selection.png", selection(json.loads(run.selection.read_text())))

    put("05_scores.png", score_histogram(json.loads(run.eval.read_text())))
    real = run_episode(EpisodeSpec("controller", seed, 1000, True, {"agent": str(run.agent_dir)}))
    panels = episode_panels(vae, mdnrnn, real)
    t = worst_moment(real.rewards)
    put("05_worst_moment.png", picture(filmstrip_rows([panels["frame"], panels["recon"], panels["dream"]],
                                                      t - 40, t + 40, n=9),
                                       f"env seed {seed}, around step {t}: real / V / M's prediction"))
    put("05_reward_prediction.png", reward_prediction(real.rewards, real.dones,
                                                      predict_along_episode(vae, mdnrnn, real),
                                                      f"env seed {seed}: return {real.total_reward:.1f}"))
    put("05_track.png", tracks([real]))
    return written
