"""The World Models agent: V -> M -> C composed into one policy for the real environment.

Each real step: V encodes the 64x64 frame to z_t, C maps [z_t, h_t] to the action a_t, and M
advances its LSTM state with (z_t, a_t), so h_{t+1} carries M's expectation of what comes next. The
three parts are jitted as one function. `AgentBatch` does the same for K episodes driven in lockstep,
all K agents in ONE jitted call per step, with actions equal to K separate `Agent`s' bit for bit.

Which z: by default a SAMPLE from V's posterior N(mu, exp(logvar)), as the paper's code does and as
C meets z in the dream (where z is drawn from M's mixtures, and dreams start from sampled posteriors).
With `z_mode="mean"` C gets V's mean instead: with most latent dimensions at the free-bits floor the
two differ a lot in spread, so a C evolved on sampled z can act differently on means. The noise of
an episode comes from the generator given to `reset`, so an episode is reproduced by its seeds.

An agent folder holds `vae.eqx`, `mdnrnn.eqx` and `controller.eqx` (`PARTS`). Wherever an agent folder
is read, a run folder (a pipeline run, or `data/pretrained`) may be given instead: it stands for its
final agent (`agent_folder`).
"""

from __future__ import annotations

import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, UInt32, UInt8

from wmlib.controller import Controller, check_fits, from_flat, load_controller, n_params, to_flat
from wmlib.env import FRAME_SHAPE
from wmlib.errors import WMError
from wmlib.mdnrnn import MDNRNN, load_mdnrnn
from wmlib.paths import PARTS, RunPaths
from wmlib.vae import load_vae

Z_MODES = ("sample", "mean")


def agent_folder(folder: str | os.PathLike) -> Path:
    """`folder` itself when it holds any of the agent's files (`PARTS`), else the final agent of the run
    in `folder` (`RunPaths.final`). Neither: an error naming the folder and what was expected."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in PARTS.values()):
        return folder
    final = RunPaths(folder).final().agent_dir
    if any((final / name).is_file() for name in PARTS.values()):
        return final
    raise FileNotFoundError(f"{folder} is neither an agent folder ({', '.join(PARTS.values())}) nor a run "
                            f"folder with its agent in agent/ (or iter_K/agent/)")


def part_path(folder: str | os.PathLike, part: str) -> Path:
    """The file of part "V", "M" or "C" of an agent folder or a run's final agent; a missing one is named
    in the error."""
    folder = agent_folder(folder)
    path = folder / PARTS[part]
    if not path.is_file():
        raise FileNotFoundError(f"agent folder {folder} has no {part} ({PARTS[part]} is missing)")
    return path


def check_compatible(vae, mdnrnn: MDNRNN, controller: Controller | None = None, where: str = "agent") -> None:
    """V, M and C must agree on z_dim (and C on M's hidden size)."""
    if vae.z_dim != mdnrnn.z_dim:
        raise WMError(f"{where}: V encodes z_dim {vae.z_dim} but M was trained on z_dim {mdnrnn.z_dim}")
    if controller is not None:
        check_fits(controller, mdnrnn.z_dim, mdnrnn.hidden, source=f"{where}: C")


@eqx.filter_jit
def agent_step(vae, mdnrnn: MDNRNN, controller: Controller, state, frame: jax.Array, key: jax.Array,
               sample: bool = True):
    """(h, c), one uint8 frame (64, 64, 3), a key -> (action (3,), new state, z_t).
    z_t is drawn from V's posterior with `key` (`sample`), else V's mean."""
    mu, logvar = vae.encode(frame.astype(jnp.float32) / 255.0)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape) if sample else mu
    action = controller(z, state[0])
    return action, mdnrnn.advance(state, z, action), z


@eqx.filter_jit
def agent_step_batch(vae, mdnrnn: MDNRNN, controller_params: Float[Array, "K n"],
                     state: tuple[Float[Array, "K hidden"], Float[Array, "K hidden"]],
                     frames: UInt8[Array, "K 64 64 3"], keys: UInt32[Array, "K 2"], sample: bool = True):
    """K agents in ONE call -> (actions (K, 3), new state (h, c) each (K, hidden), next keys (K, 2)).

    Row k is `agent_step` with C = from_flat(controller_params[k]) and the key split as `Agent.act`
    splits it, bit for bit (tests/test_batched_agent.py, on CPU). V's convolutions, most of the
    work, run on the K frames at once: they are already matrix products over all pixels of a frame,
    whose rows come out the same at any batch size. The rest (V's mu and logvar layers, z, C and M)
    goes row by row (`lax.map`): batched, a vector-matrix product becomes a matrix product that may
    sum in another order (it does for z_dim 8), and an action one rounding off sends a 1000-step
    episode elsewhere.
    """
    x = frames.astype(jnp.float32) / 255.0
    for layer in vae.encoder:  # ConvVAE.encode's convolutions
        x = jax.nn.relu(layer(x))

    def one_agent(row):
        features, params, h, c, key = row
        key, step_key = jax.random.split(key)
        mu, logvar = vae.mu(features), vae.logvar(features)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(step_key, mu.shape) if sample else mu
        action = from_flat(params, mdnrnn.z_dim, mdnrnn.hidden)(z, h)
        return action, mdnrnn.advance((h, c), z, action), key

    return jax.lax.map(one_agent, (x.reshape(len(frames), -1), controller_params, *state, keys))


def episode_key(rng: np.random.Generator) -> jax.Array:
    """The key of an episode's z noise, drawn from the episode's policy generator."""
    return jax.random.PRNGKey(int(rng.integers(2**31 - 1)))


class Agent:
    """V, M and C with M's LSTM state: `reset()` at an episode's start, then `act(frame)` per step."""

    def __init__(self, vae, mdnrnn: MDNRNN, controller: Controller, z_mode: str = "sample"):
        check_compatible(vae, mdnrnn, controller)
        if z_mode not in Z_MODES:
            raise WMError(f"unknown z_mode {z_mode!r}; valid: {', '.join(Z_MODES)}")
        self.vae, self.mdnrnn, self.controller, self.z_mode = vae, mdnrnn, controller, z_mode
        self.reset()

    @classmethod
    def load(cls, folder: str | os.PathLike, controller_params: np.ndarray | None = None,
             z_mode: str = "sample") -> "Agent":
        """Load an agent folder (or a run's final agent); with `controller_params` (flat vector) C comes
        from them instead."""
        vae, _ = load_vae(part_path(folder, "V"))
        mdnrnn, _ = load_mdnrnn(part_path(folder, "M"))
        if controller_params is None:
            controller, _ = load_controller(part_path(folder, "C"))
        else:
            controller = from_flat(jnp.asarray(controller_params, jnp.float32), mdnrnn.z_dim, mdnrnn.hidden)
        return cls(vae, mdnrnn, controller, z_mode)

    def reset(self, rng: np.random.Generator | None = None) -> None:
        """Start an episode: zero LSTM state; z's noise from `rng` (default: a generator seeded 0)."""
        self.state = self.mdnrnn.initial_state()
        self.key = episode_key(np.random.default_rng(0) if rng is None else rng)

    def act(self, frame: np.ndarray) -> np.ndarray:
        """One preprocessed frame (64, 64, 3) uint8 -> action (steer, gas, brake) float32."""
        if frame.shape != FRAME_SHAPE:
            raise ValueError(f"the agent expects a preprocessed frame of shape {FRAME_SHAPE}, got {frame.shape}")
        self.key, key = jax.random.split(self.key)
        action, self.state, _ = agent_step(self.vae, self.mdnrnn, self.controller, self.state, jnp.asarray(frame),
                                           key, self.z_mode == "sample")
        return np.asarray(action, np.float32)


class AgentBatch:
    """The agents of K episodes driven in lockstep: V and M shared, each episode with its own C (a flat
    parameter vector), LSTM state and z-noise key, started as `Agent.reset(rng)` starts one.

    `act(frames, rows)` steps the agents of the episodes still running in one `agent_step_batch`
    call. Episode k's actions equal those of an `Agent` with C = from_flat(controller_params[k])
    reset with rngs[k], bit for bit.
    """

    def __init__(self, vae, mdnrnn: MDNRNN, controller_params: list[np.ndarray], rngs: list[np.random.Generator],
                 z_mode: str = "sample"):
        check_compatible(vae, mdnrnn)
        if z_mode not in Z_MODES:
            raise WMError(f"unknown z_mode {z_mode!r}; valid: {', '.join(Z_MODES)}")
        n = n_params(mdnrnn.z_dim, mdnrnn.hidden)
        if len(controller_params) != len(rngs):
            raise ValueError(f"controller_params: expected one flat controller per episode ({len(rngs)}), "
                             f"got {len(controller_params)}")
        for k, p in enumerate(controller_params):
            if np.shape(p) != (n,):
                raise ValueError(f"controller_params[{k}]: expected a flat controller of {n} parameters for "
                                 f"z_dim={mdnrnn.z_dim}, hidden={mdnrnn.hidden}; got shape {np.shape(p)}")
        self.vae, self.mdnrnn, self.z_mode = vae, mdnrnn, z_mode
        self.params = np.asarray(controller_params, np.float32)  # (K, n)
        self.h = np.zeros((len(rngs), mdnrnn.hidden), np.float32)
        self.c = np.zeros((len(rngs), mdnrnn.hidden), np.float32)
        self.keys = np.stack([np.asarray(episode_key(rng)) for rng in rngs])

    @classmethod
    def load(cls, folder: str | os.PathLike, controller_params: list[np.ndarray | None],
             rngs: list[np.random.Generator], z_mode: str = "sample") -> "AgentBatch":
        """V and M of an agent folder; episode k's C from controller_params[k] (a flat vector), or
        from the folder's controller.eqx where that is None."""
        vae, _ = load_vae(part_path(folder, "V"))
        mdnrnn, _ = load_mdnrnn(part_path(folder, "M"))
        if any(p is None for p in controller_params):
            controller, _ = load_controller(part_path(folder, "C"), mdnrnn.z_dim, mdnrnn.hidden)
            own = np.asarray(to_flat(controller))
        return cls(vae, mdnrnn, [own if p is None else p for p in controller_params], rngs, z_mode)

    def act(self, frames: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Frames (L, 64, 64, 3) uint8 of the episodes `rows` (L,) still running -> their actions (L, 3).

        The call is padded to the next power of two of L (repeating the first row): episodes that
        ended cost nothing, and at most log2(K) + 1 shapes are ever compiled.
        """
        rows = np.asarray(rows)
        if frames.shape != (len(rows), *FRAME_SHAPE):
            raise ValueError(f"frames: expected one preprocessed frame per row, shape ({len(rows)}, "
                             f"{', '.join(map(str, FRAME_SHAPE))}); got shape {frames.shape}")
        live = len(rows)
        pad = np.concatenate([np.arange(live), np.zeros((1 << (live - 1).bit_length()) - live, int)])
        idx = rows[pad]
        actions, (h, c), keys = agent_step_batch(self.vae, self.mdnrnn, self.params[idx], (self.h[idx], self.c[idx]),
                                                 frames[pad], self.keys[idx], self.z_mode == "sample")
        for mine, new in ((self.h, h), (self.c, c), (self.keys, keys)):
            mine[rows] = np.asarray(new)[:live]
        return np.asarray(actions, np.float32)[:live]
