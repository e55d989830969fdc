"""The World Models agent: V -> M -> C composed into one policy for the real environment.

Each real step: V encodes the 64x64 frame to z_t (its posterior mean, as in the paper's test-time
agent), C maps [z_t, h_t] to the action a_t, and M advances its LSTM state with (z_t, a_t), so
h_{t+1} carries M's expectation of what comes next. The three parts are jitted as one function.

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
def agent_step(vae, mdnrnn: MDNRNN, controller: Controller, state, frame: jax.Array):
    """(h, c), one uint8 frame (64, 64, 3) -> (action (3,), new state, z_t)."""
    z, _ = vae.encode(frame.astype(jnp.float32) / 255.0)
    action = controller(z, state[0])
    return action, mdnrnn.advance(state, z, action), z


class Agent:
    """V, M and C with M's LSTM state: `reset()` at an episode's start, then `act(frame)` per step."""

    def __init__(self, vae, mdnrnn: MDNRNN, controller: Controller):
        check_compatible(vae, mdnrnn, controller)
        self.vae, self.mdnrnn, self.controller = vae, mdnrnn, controller
        self.reset()

    @classmethod
    def load(cls, folder: str | os.PathLike, controller_params: np.ndarray | None = None) -> "Agent":
        """Load an agent folder; with `controller_params` (flat vector) C comes from them instead."""
        vae, _ = load_vae(part_path(folder, "V"))
        mdnrnn, _ = load_mdnrnn(part_path(folder, "M"))
        if controller_params is None:
            controller, _ = load_controller(part_path(folder, "C"))
        else:
            controller = from_flat(jnp.asarray(controller_params, jnp.float32), mdnrnn.z_dim, mdnrnn.hidden)
        return cls(vae, mdnrnn, controller)

    def reset(self) -> None:
        self.state = self.mdnrnn.initial_state()

    def act(self, frame: np.ndarray) -> np.ndarray:
        """One preprocessed frame (64, 64, 3) uint8 -> action (steer, gas, brake) float32."""
        if frame.shape != FRAME_SHAPE:
            raise ValueError(f"the agent expects a preprocessed frame of shape {FRAME_SHAPE}, got {frame.shape}")
        action, self.state, _ = agent_step(self.vae, self.mdnrnn, self.controller, self.state, jnp.asarray(frame))
        return np.asarray(action, np.float32)
