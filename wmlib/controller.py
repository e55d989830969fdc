"""C, the controller (paper section 2.3): one linear map from [z_t, h_t] to the action a_t.

    a_t = squash(W [z_t, h_t] + b),   W: (3, z_dim + hidden),  b: (3,)

With z_dim 32 and hidden 256 that is 3 * 288 + 3 = 867 parameters, few enough for CMA-ES. The flat
parameter vector CMA-ES works on is W in row-major order followed by b (`to_flat` / `from_flat`).
The paper's ablation "V model only" is the same controller with the weights on h held at zero
(`free_params(..., inputs="z")`: CMA-ES searches the 99 others).
"""

from __future__ import annotations

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from wmlib import checkpoint
from wmlib.config import CONTROLLER_INPUTS
from wmlib.errors import WMError

ACTION_DIM = 3  # CarRacing: steer, gas, brake


def squash(a: Float[Array, "... 3"]) -> Float[Array, "... 3"]:
    """Raw outputs -> CarRacing actions: steer = tanh(a0) in [-1, 1], gas = (tanh(a1) + 1) / 2 in
    [0, 1], brake = clip(tanh(a2), 0, 1). No other clamps (hard clamps on steering were part of the
    earlier attempt's sim2real gap). A zero output means straight ahead, half gas, no brake."""
    t = jnp.tanh(a)
    return jnp.stack([t[..., 0], (t[..., 1] + 1.0) / 2.0, jnp.clip(t[..., 2], 0.0, 1.0)], axis=-1)


def n_params(z_dim: int = 32, hidden: int = 256) -> int:
    """Length of the flat parameter vector: 3 * (z_dim + hidden) + 3 (867 for the paper's sizes)."""
    return ACTION_DIM * (z_dim + hidden) + ACTION_DIM


def free_params(z_dim: int = 32, hidden: int = 256, inputs: str = "zh") -> np.ndarray:
    """Which entries of the flat vector a search may change (bool, `n_params` long): all of them for
    inputs "zh"; for "z" every weight on h stays at zero, so C sees V alone (3 * z_dim + 3 free: 99
    for the paper's sizes), and the controller is still an ordinary one with W_h = 0."""
    if inputs not in CONTROLLER_INPUTS:
        raise WMError(f"controller inputs must be one of {CONTROLLER_INPUTS}, got {inputs!r}")
    free = np.ones((ACTION_DIM, z_dim + hidden), bool)
    if inputs == "z":
        free[:, z_dim:] = False
    return np.concatenate([free.reshape(-1), np.ones(ACTION_DIM, bool)])


class Controller(eqx.Module):
    """Linear controller for ONE step: `controller(z, h) -> (3,)` squashed action."""

    weight: Float[Array, "3 in"]
    bias: Float[Array, " 3"]
    z_dim: int = eqx.field(static=True)
    hidden: int = eqx.field(static=True)

    def __init__(self, z_dim: int = 32, hidden: int = 256, *, key: jax.Array | None = None):
        """Zero weights (the CMA-ES starting mean) or, given `key`, N(0, 0.1^2) weights and zero bias."""
        self.z_dim, self.hidden = z_dim, hidden
        shape = (ACTION_DIM, z_dim + hidden)
        self.weight = jnp.zeros(shape) if key is None else 0.1 * jax.random.normal(key, shape)
        self.bias = jnp.zeros(ACTION_DIM)

    def __call__(self, z: Float[Array, " z_dim"], h: Float[Array, " hidden"]) -> Float[Array, " 3"]:
        return squash(self.weight @ jnp.concatenate([z, h]) + self.bias)


def to_flat(c: Controller) -> Float[Array, " n"]:
    """Controller -> flat vector [W row-major, b] of length `n_params(z_dim, hidden)`."""
    return jnp.concatenate([c.weight.reshape(-1), c.bias])


def from_flat(vec: Float[Array, " n"], z_dim: int = 32, hidden: int = 256) -> Controller:
    """Flat vector [W row-major, b] -> Controller (works under jit and vmap)."""
    n = n_params(z_dim, hidden)
    if vec.shape != (n,):
        raise ValueError(f"a controller for z_dim={z_dim}, hidden={hidden} has {n} parameters; "
                         f"got a vector of shape {tuple(vec.shape)}")
    k = ACTION_DIM * (z_dim + hidden)
    return eqx.tree_at(lambda c: (c.weight, c.bias), Controller(z_dim, hidden),
                       (vec[:k].reshape(ACTION_DIM, z_dim + hidden), vec[k:]))


def check_fits(controller: Controller, z_dim: int, hidden: int, source: str = "controller") -> None:
    """Fail with a clear message if `controller` was not made for a V with `z_dim` and an M with `hidden`."""
    if (controller.z_dim, controller.hidden) != (z_dim, hidden):
        raise WMError(
            f"{source} expects z_dim={controller.z_dim}, hidden={controller.hidden} "
            f"({n_params(controller.z_dim, controller.hidden)} parameters) but V/M give z_dim={z_dim}, "
            f"hidden={hidden} ({n_params(z_dim, hidden)} parameters); evolve a controller for this V and M")


def save_controller(path: str | os.PathLike, controller: Controller, extra: dict | None = None):
    """Write a controller checkpoint (kind "controller")."""
    return checkpoint.save(path, controller, "controller",
                           {"z_dim": controller.z_dim, "hidden": controller.hidden}, extra)


def load_controller(path: str | os.PathLike, z_dim: int | None = None,
                    hidden: int | None = None) -> tuple[Controller, dict]:
    """Read a controller checkpoint -> (controller, header). Given `z_dim` and `hidden` (those of the
    V and M it will drive with), a controller of another size fails with a message naming the file."""
    controller, header = checkpoint.load(path, "controller", lambda h: Controller(h["z_dim"], h["hidden"]))
    if z_dim is not None or hidden is not None:
        check_fits(controller, controller.z_dim if z_dim is None else z_dim,
                   controller.hidden if hidden is None else hidden, source=f"controller {path}")
    return controller, header
