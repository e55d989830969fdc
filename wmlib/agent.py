"""The World Models agent: V -> M -> C composed into one policy for the real environment.

Each real step: V encodes the 64x64 frame to z_t, C maps [z_t, h_t] to the action a_t, and M
advances its LSTM state with (z_t, a_t), so h_{t+1} carries M's expectation of what comes next. The
three parts are jitted as one function.

Which z: by default a SAMPLE from V's posterior N(mu, exp(logvar)), as the paper's code does and as
C meets z in the dream (where z is drawn from M's mixtures, and dreams start from sampled posteriors).
With `z_mode="mean"` C gets V's mean instead: with most latent dimensions at the free-bits floor the
two differ a lot in spread, so a C evolved on sampled z can act differently on means. The noise of
an episode comes from the generator given to `reset`, so an episode is reproduced by its seeds.

An agent folder holds `vae.eqx`, `mdnrnn.eqx` and `controller.eqx` (`data/pretrained` is one).
"""

from __future__ import annotations

import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from wmlib.controller import Controller, check_fits, from_flat, load_controller
from wmlib.env import FRAME_SHAPE
from wmlib.mdnrnn import MDNRNN, load_mdnrnn
from wmlib.vae import load_vae

PARTS = {"V": "vae.eqx", "M": "mdnrnn.eqx", "C": "controller.eqx"}
Z_MODES = ("sample", "mean")


def part_path(folder: str | os.PathLike, part: str) -> Path:
    """The file of part "V", "M" or "C" in an agent folder; a missing one is named in the error."""
    path = Path(folder) / PARTS[part]
    if not path.is_file():
        raise FileNotFoundError(f"agent folder {folder} has no {part} ({PARTS[part]} is missing)")
    return path


def check_compatible(vae, mdnrnn: MDNRNN, controller: Controller | None = None, where: str = "agent") -> None:
    """V, M and C must agree on z_dim (and C on M's hidden size)."""
    if vae.z_dim != mdnrnn.z_dim:
        raise ValueError(f"{where}: V encodes z_dim {vae.z_dim} but M was trained on z_dim {mdnrnn.z_dim}")
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


class Agent:
    """V, M and C with M's LSTM state: `reset()` at an episode's start, then `act(frame)` per step."""

    def __init__(self, vae, mdnrnn: MDNRNN, controller: Controller, z_mode: str = "sample"):
        check_compatible(vae, mdnrnn, controller)
        if z_mode not in Z_MODES:
            raise ValueError(f"unknown z_mode {z_mode!r}; valid: {', '.join(Z_MODES)}")
        self.vae, self.mdnrnn, self.controller, self.z_mode = vae, mdnrnn, controller, z_mode
        self.reset()

    @classmethod
    def load(cls, folder: str | os.PathLike, controller_params: np.ndarray | None = None,
             z_mode: str = "sample") -> "Agent":
        """Load an agent folder; with `controller_params` (flat vector) C comes from them instead."""
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
        rng = np.random.default_rng(0) if rng is None else rng
        self.key = jax.random.PRNGKey(int(rng.integers(2**31 - 1)))

    def act(self, frame: np.ndarray) -> np.ndarray:
        """One preprocessed frame (64, 64, 3) uint8 -> action (steer, gas, brake) float32."""
        if frame.shape != FRAME_SHAPE:
            raise ValueError(f"the agent expects a preprocessed frame of shape {FRAME_SHAPE}, got {frame.shape}")
        self.key, key = jax.random.split(self.key)
        action, self.state, _ = agent_step(self.vae, self.mdnrnn, self.controller, self.state, jnp.asarray(frame),
                                           key, self.z_mode == "sample")
        return np.asarray(action, np.float32)
