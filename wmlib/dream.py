"""The dream (paper section 3.3 and 4.4): M used as the environment that C is evolved in.

Gymnax style: the environment is stateless and every function is pure, so a whole rollout is one
`lax.scan`, and repeats and the CMA-ES population are `vmap`s around it:

    obs, state = reset(key, params)                                    # a start drawn from real frames
    obs, state, reward, done, info = step(key, state, action, params)  # obs = [z, h], C's input

These are gymnax's signatures (`gymnax.environments.environment.Environment.reset` / `step`, with
`DreamParams` as the env params), so code written to drive gymnax environments drives the dream
as it is: this module can stand for the env (tests/test_dream.py runs such a generic rollout).

A dream step feeds (z_t, a_t) to M, samples z_{t+1} from M's mixtures at temperature tau, and takes
the reward and the end of the episode from M's heads. The episode ends when M's done head says so,
deterministically: sigmoid(done logit) > 0.5 (a sampled end would add noise to every fitness for
no gain in realism), or after `max_steps` steps. An ended episode is frozen: its state no longer
changes and it earns no more reward.

Start states come from real encoded frames (`StartBank`), in one of three modes:
  "warm": z drawn from V's posterior of a real frame, and M's LSTM state warmed up on the up to
          `warmup` real steps before that frame (z drawn from V's posterior too, the real actions),
          as if M had been watching the drive;
  "real": the same real z, but a zero LSTM state;
  "zero": z = 0 (the mean of V's prior) and a zero LSTM state; needs no real data.

With `dropout` > 0 every dream episode draws its own dropout mask on M's LSTM (`mdnrnn.dropout_mask`)
and keeps it to the end: each dream is a slightly different world (Dropout's Dream Land).

`DreamCarRacing` wraps the same functions as a `gymnasium.Env`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import equinox as eqx
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from wmlib.controller import Controller, check_fits, from_flat
from wmlib.env import ACTION_HIGH, ACTION_LOW
from wmlib.errors import WMError
from wmlib.mdnrnn import MDNRNN, dropout_mask, sample_next_z

START_MODES = ("warm", "real", "zero")


class StartBank(eqx.Module):
    """Real encoded frames that dreams start from, with the history before each of them.

    All episodes are stored end to end (F frames in all); `starts` lists the frames a dream may
    start at and `episode_start[i]` is the first frame of frame i's episode (so a warm-up never
    reaches into the previous episode).
    """

    mu: Float[Array, "F z_dim"]
    logvar: Float[Array, "F z_dim"]
    action: Float[Array, "F action_dim"]
    episode_start: Int[Array, " F"]
    starts: Int[Array, " N"]
    warmup: int = eqx.field(static=True)


def make_start_bank(mus: Sequence[np.ndarray], logvars: Sequence[np.ndarray], actions: Sequence[np.ndarray],
                    warmup: int = 32, stride: int = 1, start_ok: Sequence[np.ndarray] | None = None) -> StartBank:
    """Per-episode V posteriors (T_i, z_dim) and actions (T_i, action_dim) -> StartBank.

    Every `stride`-th frame of every episode becomes a possible start (only those where
    `start_ok[i]`, a (T_i,) bool array, is true, when given); a warm start replays the up to
    `warmup` (z, a) steps before it.
    """
    if not len(mus) or len(mus) != len(logvars) or len(mus) != len(actions):
        raise ValueError(f"make_start_bank needs the same positive number of mu, logvar and action arrays, "
                         f"got {len(mus)}, {len(logvars)} and {len(actions)}")
    for i, (m, lv, a) in enumerate(zip(mus, logvars, actions)):
        if m.ndim != 2 or m.shape != lv.shape or a.ndim != 2 or len(a) != len(m) or not len(m):
            raise ValueError(f"episode {i}: expected mu and logvar (T, z_dim) and action (T, action_dim) "
                             f"with T > 0, got {m.shape}, {lv.shape} and {a.shape}")
    lengths = np.array([len(m) for m in mus])
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    picks = [np.arange(0, n, stride) for n in lengths]
    if start_ok is not None:
        picks = [p[np.asarray(ok, bool)[p]] for p, ok in zip(picks, start_ok)]
    starts = np.concatenate([f + p for f, p in zip(np.cumsum(lengths) - lengths, picks)])
    if not len(starts):
        raise WMError("make_start_bank: no frame is allowed as a start (start_ok is false everywhere)")
    as_f32 = lambda xs: jnp.asarray(np.concatenate(xs), jnp.float32)  # noqa: E731
    return StartBank(as_f32(mus), as_f32(logvars), as_f32(actions), jnp.asarray(first, jnp.int32),
                     jnp.asarray(starts, jnp.int32), warmup)


class DreamParams(eqx.Module):
    """Everything a dream needs: M, the start bank, the temperature, the episode length, the start
    mode, the dropout rate of M per dream episode, and whether M's done head ends it (`ends`; False: the
    dream goes on past it, as a real episode goes on when the car leaves the road)."""

    mdnrnn: MDNRNN
    bank: StartBank | None
    tau: Float[Array, ""]
    dropout: Float[Array, ""]
    ends: Bool[Array, ""]
    max_steps: int = eqx.field(static=True)
    start: str = eqx.field(static=True)

    def __init__(self, mdnrnn: MDNRNN, bank: StartBank | None = None, tau: float = 1.0,
                 max_steps: int = 1000, start: str = "warm", dropout: float = 0.0, ends: bool = True):
        if start not in START_MODES:
            raise WMError(f"unknown dream start mode {start!r}; valid modes: {', '.join(START_MODES)}")
        if start != "zero" and bank is None:
            raise ValueError(f"dream start mode {start!r} needs a StartBank of real encoded frames "
                             "(make_start_bank), or use start='zero'")
        if bank is not None and (bank.mu.shape[1], bank.action.shape[1]) != (mdnrnn.z_dim, mdnrnn.action_dim):
            raise WMError(f"the start bank has z_dim {bank.mu.shape[1]} and action_dim {bank.action.shape[1]}, "
                             f"M expects {mdnrnn.z_dim} and {mdnrnn.action_dim}")
        if not tau > 0 or max_steps < 1:
            raise WMError(f"need tau > 0 and max_steps >= 1, got tau={tau}, max_steps={max_steps}")
        if not 0 <= dropout < 1:
            raise WMError(f"dream dropout must lie in [0, 1), got {dropout}")
        self.mdnrnn, self.bank, self.max_steps, self.start = mdnrnn, bank, max_steps, start
        self.tau = jnp.asarray(tau, jnp.float32)  # arrays, so a new tau or dropout does not recompile
        self.dropout = jnp.asarray(dropout, jnp.float32)
        self.ends = jnp.asarray(ends, bool)


class DreamState(eqx.Module):
    """One dream episode's state: the current latent, M's LSTM state, the step count and end flags."""

    z: Float[Array, " z_dim"]
    h: Float[Array, " hidden"]
    c: Float[Array, " hidden"]
    t: Int[Array, ""]
    done: Bool[Array, ""]         # the episode is over (M's done head, or max_steps reached)
    terminated: Bool[Array, ""]   # M's done head ended it
    mask: tuple[Float[Array, " in"], Float[Array, " hidden"]]  # this dream's dropout mask on M (ones: none)


def reset(key: jax.Array, params: DreamParams) -> tuple[Float[Array, " obs"], DreamState]:
    """Start one dream episode -> (obs [z_0, h_0], state); see the module docstring for the start modes."""
    m = params.mdnrnn
    h, c = m.initial_state()
    # its own stream (fold_in), so the start drawn from `key` is the same with or without dropout
    mask = dropout_mask(jax.random.fold_in(key, 1), params.dropout, m.z_dim + m.action_dim, m.hidden)
    if params.start == "zero":
        z = jnp.zeros(m.z_dim)
    else:
        b = params.bank
        assert b is not None, f"a dream that starts {params.start!r} needs a StartBank"
        kidx, kz, kw = jax.random.split(key, 3)
        s = b.starts[jax.random.randint(kidx, (), 0, b.starts.shape[0])]
        z = b.mu[s] + jnp.exp(0.5 * b.logvar[s]) * jax.random.normal(kz, (m.z_dim,))
        if params.start == "warm":
            idx = s - b.warmup + jnp.arange(b.warmup)
            valid = idx >= b.episode_start[s]
            idx = jnp.maximum(idx, 0)
            zs = b.mu[idx] + jnp.exp(0.5 * b.logvar[idx]) * jax.random.normal(kw, (b.warmup, m.z_dim))

            def warm(hc, x):
                zi, ai, ok = x
                new = m.advance(hc, zi, ai)
                return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, hc), None

            (h, c), _ = jax.lax.scan(warm, (h, c), (zs, b.action[idx], valid))
    false = jnp.zeros((), bool)
    state = DreamState(z, h, c, jnp.zeros((), jnp.int32), false, false, mask)
    return observation(state), state


def road_starts(offroad: np.ndarray, ahead: int = 20) -> np.ndarray:
    """(T,) bool: frames a dream may start at like a real episode does: the episode's first frame, and
    frames after which the car stays on the road for the next `ahead` steps (`offroad` as recorded by
    `data.Episode.offroad`)."""
    off = np.asarray(offroad) > 0.5
    T = len(off)
    # soon[t]: an off-road flag among steps t-1 .. t+ahead-1 (the action into frame t and `ahead` after it)
    cum = np.concatenate([[0], np.cumsum(off)])
    lo, hi = np.clip(np.arange(T) - 1, 0, T), np.clip(np.arange(T) + ahead, 0, T)
    ok = cum[hi] - cum[lo] == 0
    ok[:1] = True
    return ok


def observation(state: DreamState) -> Float[Array, " obs"]:
    """C's input [z_t, h_t]."""
    return jnp.concatenate([state.z, state.h])


def step(key: jax.Array, state: DreamState, action: Float[Array, " action_dim"], params: DreamParams
         ) -> tuple[Float[Array, " obs"], DreamState, Float[Array, ""], Bool[Array, ""], dict]:
    """One dream step -> (obs [z_{t+1}, h_{t+1}], state, reward r_t, done, info {"terminated"}).

    done: the episode is over, because M's done head ended it (info["terminated"]) or after
    `params.max_steps` steps. A done state stays as it is and earns 0.
    """
    (h, c), out = params.mdnrnn.step((state.h, state.c), state.z, action, state.mask)
    z = sample_next_z(key, out, params.tau)
    terminated = (out.done_logit > 0.0) & params.ends  # sigmoid(logit) > 0.5
    t = state.t + 1
    new = DreamState(z, h, c, t, terminated | (t >= params.max_steps), terminated, state.mask)
    new = jax.tree.map(lambda old, n: jnp.where(state.done, old, n), state, new)
    return observation(new), new, jnp.where(state.done, 0.0, out.reward), new.done, {"terminated": new.terminated}


class Trajectory(NamedTuple):
    """A dream rollout step by step (time axis first): the latent C saw, its action, reward, done."""
    z: Float[Array, "T z_dim"]
    action: Float[Array, "T action_dim"]
    reward: Float[Array, " T"]
    done: Bool[Array, " T"]


def _rollout(key, controller: Controller, params: DreamParams, steps: int, trace: bool):
    check_fits(controller, params.mdnrnn.z_dim, params.mdnrnn.hidden)
    k_reset, k_steps = jax.random.split(key)

    def body(carry, k):
        state, ret = carry
        action = controller(state.z, state.h)
        _, new, reward, done, _ = step(k, state, action, params)
        return (new, ret + reward), (Trajectory(state.z, action, reward, done) if trace else None)

    _, start = reset(k_reset, params)
    (_, ret), traj = jax.lax.scan(body, (start, jnp.zeros(())), jax.random.split(k_steps, steps))
    return ret, traj


def rollout(key: jax.Array, controller: Controller, params: DreamParams, steps: int) -> Float[Array, ""]:
    """Total dream reward of `controller` over `steps` steps from one start (one lax.scan)."""
    return _rollout(key, controller, params, steps, trace=False)[0]


@eqx.filter_jit
def rollout_trajectory(key: jax.Array, controller: Controller, params: DreamParams, steps: int
                       ) -> tuple[Float[Array, ""], Trajectory]:
    """`rollout`, also returning the trajectory (for pictures: decode `z` with V). Same key, same dream.
    Jitted: compiled once per (steps, shapes), not on every call."""
    return _rollout(key, controller, params, steps, trace=True)


@eqx.filter_jit
def population_returns(key: jax.Array, flat_params: Float[Array, "P n"], params: DreamParams,
                       repeats: int, steps: int) -> Float[Array, "P repeats"]:
    """Dream returns of P controllers (flat vectors, `controller.to_flat` order), `repeats` rollouts each.

    One jitted call: vmap over the population and the repeats around the scan. Every candidate
    meets the same `repeats` dreams (rollout keys `jax.random.split(key, repeats)`: the same starts
    and noise, common random numbers), so CMA-ES ranks controllers rather than their luck.
    """
    m = params.mdnrnn
    keys = jax.random.split(key, repeats)

    def candidate(vec):
        controller = from_flat(vec, m.z_dim, m.hidden)
        return jax.vmap(lambda k: rollout(k, controller, params, steps))(keys)

    return jax.vmap(candidate)(flat_params)


def start_from_frame(mdnrnn: MDNRNN, mu: Float[Array, "T z_dim"], actions: Float[Array, "T action_dim"],
                     index: int, warmup: int = 32) -> DreamState:
    """A dream that starts at real frame `index` of one encoded episode: z = V's mean of that frame,
    M's LSTM warmed up on the (up to `warmup`) real (z, a) steps before it."""
    h, c = mdnrnn.initial_state()
    for t in range(max(0, index - warmup), index):
        h, c = mdnrnn.advance((h, c), jnp.asarray(mu[t]), jnp.asarray(actions[t]))
    false = jnp.zeros((), bool)
    no_dropout = (jnp.ones(mdnrnn.z_dim + mdnrnn.action_dim), jnp.ones(mdnrnn.hidden))
    return DreamState(jnp.asarray(mu[index]), h, c, jnp.zeros((), jnp.int32), false, false, no_dropout)


class DreamDrive(NamedTuple):
    """A driven dream, step by step: latents z_0..z_T (T+1), actions, M's reward and done probability."""
    z: Float[Array, "T1 z_dim"]
    action: Float[Array, "T action_dim"]
    reward: Float[Array, " T"]
    done_prob: Float[Array, " T"]


@eqx.filter_jit
def drive(key: jax.Array, state: DreamState, mdnrnn: MDNRNN, tau: Float[Array, ""],
          manual: Float[Array, "T action_dim"], use_controller: Bool[Array, " T"],
          controller: Controller) -> DreamDrive:
    """Dream T steps from `state`; at step t the action is C's (where use_controller[t]) or manual[t].

    Step t draws its noise from fold_in(key, t), so the first k steps do not depend on what comes
    after them: a player can extend or rewrite the future without changing the past. Episodes do not
    freeze here (the player shows what M imagines even after it predicts the end; done_prob says so).
    """
    def body(carry, x):
        (h, c), z = carry
        t, a_manual, use_c = x
        a = jnp.where(use_c, controller(z, h), a_manual)
        (h, c), out = mdnrnn.step((h, c), z, a)
        z_next = sample_next_z(jax.random.fold_in(key, t), out, tau)
        return ((h, c), z_next), (z_next, a, out.reward, jax.nn.sigmoid(out.done_logit))

    T = manual.shape[0]
    _, (zs, actions, rewards, dones) = jax.lax.scan(
        body, ((state.h, state.c), state.z), (jnp.arange(T), manual, use_controller))
    return DreamDrive(jnp.concatenate([state.z[None], zs]), actions, rewards, dones)


class DreamCarRacing(gym.Env):
    """The dream as a Gymnasium environment with CarRacing's action space.

    Observations are C's input [z, h] (float32, z_dim + hidden; z unbounded, h in [-1, 1]); actions
    (steer, gas, brake) must lie in Box([-1, 0, 0], [1, 1, 1]). With render_mode "rgb_array",
    `render()` decodes the current z through `vae` (anything with `.decode(z) -> (64, 64, 3)` in
    [0, 1]) to a uint8 RGB frame.
    Episodes end as in `step`: terminated by M's done head, truncated after `params.max_steps`.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(self, params: DreamParams, vae=None, render_mode: str | None = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode {render_mode!r} is not supported; use None or 'rgb_array'")
        if render_mode == "rgb_array" and vae is None:
            raise ValueError("render_mode 'rgb_array' needs a vae (an object with .decode(z)) to draw z")
        m = params.mdnrnn
        self.params, self.vae, self.render_mode = params, vae, render_mode
        # z is a Gaussian-mixture sample (unbounded); h = sigmoid(o) tanh(c) lies in [-1, 1]
        bound = np.concatenate([np.full(m.z_dim, np.inf), np.ones(m.hidden)]).astype(np.float32)
        self.observation_space = gym.spaces.Box(-bound, bound, dtype=np.float32)
        self.action_space = gym.spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)
        self._reset, self._step = eqx.filter_jit(reset), eqx.filter_jit(step)
        self._decode = eqx.filter_jit(lambda vae, z: vae.decode(z))
        self._state: DreamState | None = None
        self._key: jax.Array | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._key, k = jax.random.split(jax.random.PRNGKey(int(self.np_random.integers(2**31 - 1))))
        obs, self._state = self._reset(k, self.params)
        return np.array(obs, np.float32), {"t": 0}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("DreamCarRacing.step called before reset()")
        a = np.asarray(action, np.float32)
        if a.shape != (3,) or not self.action_space.contains(a):
            raise ValueError(f"action {np.asarray(action).tolist()} is outside the CarRacing action space: "
                             "expected (steer, gas, brake) with steer in [-1, 1], gas and brake in [0, 1]")
        self._key, k = jax.random.split(self._key)
        obs, self._state, reward, done, info = self._step(k, self._state, jnp.asarray(a), self.params)
        terminated = bool(info["terminated"])
        return (np.array(obs, np.float32), float(reward), terminated, bool(done) and not terminated,
                {"t": int(self._state.t)})

    def render(self):
        if self.render_mode is None:
            gym.logger.warn("DreamCarRacing.render() called without a render_mode; "
                            "make the env with render_mode='rgb_array' and a vae")
            return None
        if self._state is None:
            raise RuntimeError("DreamCarRacing.render called before reset()")
        frame = np.asarray(self._decode(self.vae, self._state.z))
        return np.round(np.clip(frame, 0.0, 1.0) * 255.0).astype(np.uint8)

