"""The sim2real analysis of a recorded real episode: what did M expect here?

M's predicted reward and done along the episode (`predict_along_episode`), how fast its open-loop
predictions of z drift from what V saw (`latent_error_vs_horizon`), the worst stretch of an episode
(`worst_moment`), and the media that show it: per-step panels of the frame, V's reconstruction and
M's prediction (`episode_panels`), videos and filmstrips (`write_media`). Where on the track the car
left the road is `env.offroad_steps` against `env.track_of_seed`. The episodes come from
`evaluate.evaluate(..., save_dir=...)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from wmlib.data import Episode
from wmlib.mdnrnn import MDNRNN, MDNOutputs
from wmlib.errors import WMError


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
        raise WMError(f"episode of {len(z)} steps is too short for horizon {horizon}")
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
