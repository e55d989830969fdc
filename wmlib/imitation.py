"""The imitation bound: what a linear C on this V and M can do at all (a diagnostic, not the method).

C is fitted by least squares to the actions of the heuristic driver, which reads the track geometry
(privileged information the method never has), then improved by DAgger rounds: the fitted agent
drives and the heuristic says what it would have done at every step, and C is refitted on all the
labels so far. Its real score bounds what evolution in the dream could hope to find in the same
linear family on the same [z, h]; it is never shipped as the agent, nor used to start evolution.

The fit works on C's pre-squash outputs: steer = tanh(a0) -> a0 = atanh(steer); gas = (tanh(a1) + 1) / 2
-> a1 = atanh(2 gas - 1); brake = clip(tanh(a2), 0, 1) -> a2 = atanh(brake), and -0.5 where the
heuristic does not brake (any a2 <= 0 gives brake 0). Targets are clipped to +-atanh(0.95) so the
saturated actions of the heuristic do not dominate the squared error.
"""

from __future__ import annotations

import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from wmlib.controller import Controller, save_controller
from wmlib.errors import WMError
from wmlib.policies import HeuristicPolicy, Policy
from wmlib.rollouts import EpisodeSpec, default_workers, parallel_map, run_episode

NO_BRAKE = -0.5
SATURATION = 0.95


def action_targets(actions: np.ndarray) -> np.ndarray:
    """CarRacing actions (T, 3) -> C's pre-squash outputs (T, 3) that produce them (see module doc)."""
    a = np.asarray(actions, np.float64)
    steer = np.arctanh(np.clip(a[:, 0], -SATURATION, SATURATION))
    gas = np.arctanh(np.clip(2 * a[:, 1] - 1, -SATURATION, SATURATION))
    brake = np.where(a[:, 2] > 0, np.arctanh(np.clip(a[:, 2], 0, SATURATION)), NO_BRAKE)
    return np.stack([steer, gas, brake], axis=1)


@eqx.filter_jit
def _features(vae, mdnrnn, frames: jax.Array, actions: jax.Array, key: jax.Array) -> jax.Array:
    """[z_t, h_t] (T, z_dim + hidden) as the agent sees them driving this episode: z drawn from V's
    posterior (the agent's default), h from M watching (z, a)."""
    mu, logvar = jax.vmap(vae.encode)(frames.astype(jnp.float32) / 255.0)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)

    def body(state, x):
        return mdnrnn.advance(state, *x), state[0]

    _, hs = jax.lax.scan(body, mdnrnn.initial_state(), (z, actions))
    return jnp.concatenate([z, hs], axis=1)


def fit_linear(features: np.ndarray, targets: np.ndarray, ridge: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression targets (N, 3) ~ features (N, d) W^T + b -> (W (3, d), b (3,)); b unpenalised."""
    X = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    penalty = ridge * np.eye(X.shape[1])
    penalty[-1, -1] = 0.0
    coef = np.linalg.solve(X.T @ X + penalty, X.T @ targets)  # (d + 1, 3)
    return coef[:-1].T, coef[-1]


class LabelledDriver(Policy):
    """Drives with a World-Models agent while recording what the heuristic would have done (DAgger)."""

    name = "labelled"

    def __init__(self, agent_dir: str, controller_params: list[float]):
        from wmlib.policies import ControllerPolicy

        self.driver = ControllerPolicy(agent_dir, controller_params)
        self.teacher = HeuristicPolicy()
        self.labels: list[np.ndarray] = []

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        self.driver.reset(rng)
        self.teacher.reset(rng)
        self.labels = []

    def act(self, obs: np.ndarray, env) -> np.ndarray:
        self.labels.append(self.teacher.act(obs, env))
        return self.driver.act(obs, env)


def _labelled_episode(args: tuple) -> dict:
    """Worker: one real episode driven by the agent, with the heuristic's labels."""
    agent_dir, params, seed, max_steps = args
    policy = LabelledDriver(agent_dir, params)
    ep = run_episode(EpisodeSpec("labelled", seed, max_steps), policy=policy)
    return {"frames": ep.frames, "actions": ep.actions, "labels": np.stack(policy.labels), "return": ep.total_reward}


def imitation_bound(agent_dir: str | os.PathLike, heuristic_episodes: list, out: str | os.PathLike,
                    rounds: int = 2, episodes_per_round: int = 16, seed: int = 0, max_steps: int = 1000,
                    workers: int | None = None, ridge: float = 1.0) -> dict:
    """Fit C to the heuristic driver's episodes (`data.Episode`s), then `rounds` DAgger rounds of
    `episodes_per_round` real episodes (round r on env seeds seed + 1000 r + i: give a training-range
    seed). Writes OUT/controller.eqx (with V and M copied beside it, an agent folder) and returns
    {"rounds": [{labels, return_mean}], "frames"} (real frames driven by the DAgger rounds)."""
    from wmlib.agent import part_path
    from wmlib.config import check_seeds
    from wmlib.paths import PARTS
    from wmlib.mdnrnn import load_mdnrnn
    from wmlib.pipeline import assemble_agent
    from wmlib.vae import load_vae

    if not heuristic_episodes:
        raise WMError("imitation_bound needs at least one heuristic episode to fit C to")
    check_seeds("training", seed, 1000 * max(rounds - 1, 0) + episodes_per_round, "imitation DAgger seeds")
    vae, _ = load_vae(part_path(agent_dir, "V"))
    mdnrnn, _ = load_mdnrnn(part_path(agent_dir, "M"))
    feats, targets = [], []
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(heuristic_episodes) + rounds * episodes_per_round))
    for ep in heuristic_episodes:
        feats.append(np.asarray(_features(vae, mdnrnn, jnp.asarray(ep.frames), jnp.asarray(ep.actions), next(keys))))
        targets.append(action_targets(ep.actions))
    out = Path(out)
    assemble_agent(out, part_path(agent_dir, "V"), part_path(agent_dir, "M"))
    log, frames = [], 0
    for r in range(rounds + 1):
        W, b = fit_linear(np.concatenate(feats), np.concatenate(targets), ridge)
        controller = Controller(mdnrnn.z_dim, mdnrnn.hidden)
        controller = eqx.tree_at(lambda c: (c.weight, c.bias), controller,
                                 (jnp.asarray(W, jnp.float32), jnp.asarray(b, jnp.float32)))
        save_controller(out / PARTS["C"], controller, extra={"imitation_round": r})
        entry: dict[str, float] = {"round": r, "labels": int(sum(len(t) for t in targets))}
        if r < rounds:
            params = np.concatenate([W.reshape(-1), b]).tolist()
            items = [(str(out), params, seed + 1000 * r + i, max_steps) for i in range(episodes_per_round)]
            returns = []
            for _, res, error in parallel_map(_labelled_episode, items, workers or default_workers(),
                                              desc=f"DAgger round {r + 1}"):
                if error is not None:
                    raise RuntimeError(f"DAgger episode failed: {error}")
                feats.append(np.asarray(_features(vae, mdnrnn, jnp.asarray(res["frames"]),
                                                  jnp.asarray(res["actions"]), next(keys))))
                targets.append(action_targets(res["labels"]))
                returns.append(res["return"])
                frames += len(res["frames"])
            entry["driver_return_mean"] = float(np.mean(returns))
        log.append(entry)
        print(f"imitation round {r}: {entry}")
    return {"rounds": log, "frames": frames}
