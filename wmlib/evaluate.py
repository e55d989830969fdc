"""Real-environment evaluation of an agent, and the sim2real analysis of what M predicted.

`evaluate` runs N real CarRacing-v3 episodes (episode i on env seed S+i) on worker processes, each
worker driving a block of up to K episodes in lockstep with one jitted V -> M -> C call per step for
all of them (`rollouts.run_agent_episodes`, scores equal to one episode at a time), and returns
mean, std and every score. The analysis
functions take a recorded real episode and ask: what did M expect here? Its predicted reward and
done along the episode, how fast its open-loop predictions of z drift from what V saw (latent error
vs horizon), and where on the track the car left the road.
"""

from __future__ import annotations

import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from wmlib.config import TRAINING_SEED
from wmlib.data import Episode, episode_name, save_episode
from wmlib.env import TRACK_HALF_WIDTH, offroad_steps, track_of_seed  # noqa: F401 (the lessons import them here)
from wmlib.mdnrnn import MDNRNN, MDNOutputs
from wmlib.rollouts import (EpisodeSpec, default_workers, out_of_patience, parallel_map, run_agent_episodes,
                            split_blocks)


def _drive_block(args: tuple) -> list[dict]:
    """Worker: a block of controller episodes driven in lockstep; saves them when asked; returns
    their summaries, each with "gave_up" (ended early for want of new tiles, `out_of_patience`)."""
    specs, save_dir = args
    summaries = []
    for spec, ep in zip(specs, run_agent_episodes(specs)):
        if save_dir:
            save_episode(Path(save_dir) / episode_name("agent", spec.seed), ep)
        summaries.append({**ep.summary(), "gave_up": not ep.terminated and out_of_patience(ep.rewards, spec.patience)})
    return summaries


def _block_frames(summaries: list[dict]) -> int:
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
        raise ValueError(f"--episodes must be a positive integer, got {episodes}")
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
    for (block, _), result, error in parallel_map(_drive_block, items, workers, desc="evaluate", unit="block",
                                                  frames_of=_block_frames, progress=progress):
        if error is None:
            scores.update((r["seed"], r["return"]) for r in result)
            frames += _block_frames(result)
        else:
            failed += [{"seed": spec.seed, "error": f"{type(error).__name__}: {error}"} for spec in block]
    values = [scores[s] for s in sorted(scores)]
    return {"mean": float(np.mean(values)) if values else float("nan"),
            "std": float(np.std(values)) if values else float("nan"), "episodes": episodes, "seed": seed,
            "scores": values, "frames": frames, "failed": failed}


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
            raise ValueError(f"patience (steps without a new tile before an episode ends) must be a positive "
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
        for item, result, error in parallel_map(_drive_block, items, self.workers, progress=False):
            i = first[id(item)]
            if error is not None:
                raise RuntimeError(f"real episodes of candidates {i // self.repeats}.."
                                   f"{(i + len(item[0]) - 1) // self.repeats} failed: {error}")
            returns[i:i + len(result)] = [r["return"] for r in result]
            self.frames += _block_frames(result)
            self.frames_saved += sum(self.max_steps - r["steps"] for r in result if r["gave_up"])
        return returns.reshape(len(solutions), self.repeats)


# ---- what M predicted along a real episode ------------------------------------------------------

def mixture_mean(out: MDNOutputs) -> jax.Array:
    """The mean of M's per-dimension mixtures: sum_k softmax(logits)_k mu_k -> (..., z_dim)."""
    return jnp.sum(jax.nn.softmax(out.logits, axis=-1) * out.mu, axis=-1)


@eqx.filter_jit
def _predict(vae, mdnrnn: MDNRNN, frames: jax.Array, actions: jax.Array):
    z, _ = jax.vmap(vae.encode)(frames.astype(jnp.float32) / 255.0)
    out = mdnrnn.forward_sequence(z, actions)
    return z, out.reward, jax.nn.sigmoid(out.done_logit), mixture_mean(out)


def predict_along_episode(vae, mdnrnn: MDNRNN, ep: Episode) -> dict[str, np.ndarray]:
    """V and M watching a real episode, exactly as the agent does (z = V's mean, h from real z, a).

    Returns z (T, z_dim), reward_pred and done_prob (T,) for the step after each action, and z_pred
    (T, z_dim): M's expected next latent (so z_pred[t] should match z[t+1]).
    """
    z, reward, done, z_pred = _predict(vae, mdnrnn, jnp.asarray(ep.frames), jnp.asarray(ep.actions))
    return {"z": np.asarray(z), "reward_pred": np.asarray(reward), "done_prob": np.asarray(done),
            "z_pred": np.asarray(z_pred)}


@eqx.filter_jit
def _open_loop(mdnrnn: MDNRNN, z: jax.Array, actions: jax.Array, starts: jax.Array, horizon: int):
    hs = _states_along(mdnrnn, z, actions)

    def one(s):
        def body(carry, k):
            state, z_hat = carry
            state, out = mdnrnn.step(state, z_hat, actions[s + k])
            z_next = mixture_mean(out)
            return (state, z_next), jnp.mean((z_next - z[s + k + 1]) ** 2)
        _, err = jax.lax.scan(body, ((hs[0][s], hs[1][s]), z[s]), jnp.arange(horizon))
        return err

    return jax.vmap(one)(starts)


def _states_along(mdnrnn: MDNRNN, z, actions):
    """M's LSTM state before each step t, having watched the real (z, a) of steps < t."""
    def body(state, x):
        new = mdnrnn.advance(state, *x)
        return new, state
    _, states = jax.lax.scan(body, mdnrnn.initial_state(), (z, actions))
    return states


def latent_error_vs_horizon(mdnrnn: MDNRNN, z: np.ndarray, actions: np.ndarray, horizon: int = 20,
                            every: int = 10) -> np.ndarray:
    """Mean squared error between M's open-loop prediction and V's real z, k = 1..horizon steps ahead.

    From every `every`-th step, M is warmed up on the real past, then fed its own predictions (mixture
    means) and the real actions. Returns (horizon,) errors averaged over the starting points.
    """
    starts = np.arange(0, len(z) - horizon - 1, every)
    if not len(starts):
        raise ValueError(f"episode of {len(z)} steps is too short for horizon {horizon}")
    err = _open_loop(mdnrnn, jnp.asarray(z), jnp.asarray(actions), jnp.asarray(starts), horizon)
    return np.asarray(err).mean(axis=0)


def worst_moment(rewards: np.ndarray, window: int = 50) -> int:
    """The centre of the `window`-step stretch with the least reward (off the road, no new tiles)."""
    if len(rewards) <= window:
        return len(rewards) // 2
    sums = np.convolve(rewards, np.ones(window), mode="valid")
    return int(np.argmin(sums)) + window // 2


@eqx.filter_jit
def _decode_all(vae, z: jax.Array) -> jax.Array:
    return jax.vmap(vae.decode)(z)


def episode_panels(vae, mdnrnn: MDNRNN, ep: Episode) -> dict[str, np.ndarray]:
    """Per step, what the agent saw and expected: the frame, V's reconstruction, and M's prediction of
    this frame made one step earlier (decoded), each (T, 64, 64, 3) uint8, plus the predictions."""
    from wmlib.viz import to_uint8

    pred = predict_along_episode(vae, mdnrnn, ep)
    recon = to_uint8(np.asarray(_decode_all(vae, jnp.asarray(pred["z"]))))
    dream_next = to_uint8(np.asarray(_decode_all(vae, jnp.asarray(pred["z_pred"]))))
    dream = np.concatenate([recon[:1], dream_next[:-1]])  # M's guess for frame t, made at t-1
    return {"frame": ep.frames, "recon": recon, "dream": dream, **pred}


def write_media(agent_dir: str | os.PathLike, episodes_dir: str | os.PathLike,
                video_dir: str | os.PathLike | None = None, filmstrip: bool = False) -> list[Path]:
    """mp4 per episode (raw frame | what V sees | M's prediction) and/or a PNG filmstrip around the
    worst moment, for every agent episode saved in `episodes_dir`. Returns the files written."""
    from wmlib.agent import Agent
    from wmlib.data import episode_files, load_episode
    from wmlib.files import atomic_write, write_mp4
    from wmlib.viz import agent_video_frame, filmstrip_rows, png_bytes

    agent = Agent.load(agent_dir)
    written = []
    for path in episode_files(episodes_dir):
        ep = load_episode(path)
        panels = episode_panels(agent.vae, agent.mdnrnn, ep)
        if video_dir:
            raw = ep.info.get("raw")
            frames = [agent_video_frame(raw[t] if raw is not None else ep.frames[t], panels["recon"][t],
                                        panels["dream"][t]) for t in range(len(ep))]
            written.append(write_mp4(Path(video_dir) / f"{path.stem}.mp4", frames))
        if filmstrip:
            t = worst_moment(ep.rewards)
            image = filmstrip_rows([panels["frame"], panels["recon"], panels["dream"]], t - 40, t + 40, n=9)
            target = Path(episodes_dir) / f"{path.stem}_worst.png"
            with atomic_write(target) as f:
                f.write(png_bytes(image))
            written.append(target)
    return written
