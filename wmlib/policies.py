"""Driving policies that produce the real-environment data V and M learn from.

The paper collects 10,000 rollouts of a random policy. A random driver rarely stays on the road, so
M never sees a good lap and the evolved controller dreams of a world it cannot reach (the sim2real
gap of the earlier attempt). We therefore mix drivers of different skill:

- `random`: the paper's choice, a random linear controller per episode, squashed like C's actions;
- `brownian`: a smooth random walk of the controls, the car wanders on and off the road;
- `heuristic`: a track-following driver that reads the track geometry (privileged information
  that only data collection may use), so the data contain good laps;
- `recovery`: the heuristic with random mistakes (bursts, hands-off, braking), so the data contain
  slides and the recoveries from them;
- `weave`: the heuristic with a random hand on the wheel, so the data show what steering does at
  speed (the heuristic's own steering follows the road, which teaches M little about its effect);
- `controller`: a trained World-Models agent (V, M and C), for the sim2real loop.

Every policy takes all its randomness from the generator given to `reset`, so an episode is
reproduced by its env seed and its policy seed. Actions are float32 (steer, gas, brake) with steer
in [-1, 1] (positive steers right), gas and brake in [0, 1].
"""

from __future__ import annotations

import math
import os
from typing import Any

import cv2
import gymnasium as gym
import jax.numpy as jnp
import numpy as np

from wmlib.controller import squash
from wmlib.env import ACTION_HIGH, ACTION_LOW, TRACK_HALF_WIDTH, preprocess
from wmlib.errors import WMError



def _as_action(steer: float, gas: float, brake: float) -> np.ndarray:
    """(3,) float32 action clipped to CarRacing's action space."""
    return np.clip(np.array([steer, gas, brake], np.float32), ACTION_LOW, ACTION_HIGH)


class Policy:
    """A driver: `reset(rng)` at the start of each episode, then `act(obs, env)` at every step.

    `obs` is the raw 96x96x3 uint8 observation; `env` is the environment it came from, for the
    drivers that read the track (`env.unwrapped.track` and `env.unwrapped.car`).
    """

    name: str = ""

    def reset(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def act(self, obs: np.ndarray, env: gym.Env) -> np.ndarray:
        raise NotImplementedError

    def _require_rng(self) -> np.random.Generator:
        rng = getattr(self, "rng", None)
        if rng is None:
            raise RuntimeError(f"policy {self.name!r}: call reset(rng) before act() so that the "
                               f"episode's randomness comes from a seeded generator")
        return rng


class RandomPolicy(Policy):
    """The paper's random driver: a linear controller whose weights are drawn anew each episode.

    Features are the frame V sees, shrunk to 8x8 grey levels in [0, 1] and centred at 0.5, plus a
    bias, so the action depends a little on the view and mostly on the episode's draw (some
    episodes floor it, some crawl, some brake). The weight scale is itself random per episode, as
    in the original extraction script, so both near-constant and jittery drivers appear.
    """

    name = "random"
    FEATURE_SIDE = 8

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        n_features = self.FEATURE_SIDE**2 + 1
        scale = rng.uniform(0.0, 1.0) * 4.0 / math.sqrt(n_features)
        self.weights = rng.normal(0.0, 1.0, (3, n_features)) * scale
        self.weights[:, -1] = rng.normal(0.0, 1.0, 3)  # the bias sets the episode's mean action

    def features(self, obs: np.ndarray) -> np.ndarray:
        """(65,) float: the 64x64 frame as 8x8 grey levels minus 0.5, then a constant 1."""
        grey = cv2.cvtColor(preprocess(obs), cv2.COLOR_RGB2GRAY)
        small = cv2.resize(grey, (self.FEATURE_SIDE, self.FEATURE_SIDE), interpolation=cv2.INTER_AREA)
        return np.append(small.ravel() / 255.0 - 0.5, 1.0)

    def act(self, obs: np.ndarray, env: gym.Env) -> np.ndarray:
        self._require_rng()
        return np.asarray(squash(jnp.asarray(self.weights @ self.features(obs), jnp.float32)), np.float32)


class BrownianPolicy(Policy):
    """Controls that wander as mean-reverting random walks (Ornstein-Uhlenbeck), then are clipped.

    Steering reverts to 0, gas to a positive level so the car keeps moving, brake to a negative
    level so that after clipping it is 0 most of the time with occasional smooth presses. The
    per-step noise is clipped at 3 sigma, which bounds every increment by `max_increment`: the
    controls look like a human's hands, not white noise, and the car drives long arcs that take it
    off the road and sometimes back on.
    """

    name = "brownian"

    def __init__(self, theta: float = 0.05, sigma: tuple[float, float, float] = (0.03, 0.08, 0.08),
                 mean: tuple[float, float, float] = (0.0, 0.3, -0.25)):
        self.theta = theta
        self.sigma = np.asarray(sigma, np.float64)
        self.mean = np.asarray(mean, np.float64)

    @property
    def max_increment(self) -> np.ndarray:
        """(3,) largest possible |change| of each control in one step (the walk stays in +-1.5)."""
        return self.theta * 3.0 + 3.0 * self.sigma

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        self.state = self.mean + rng.normal(0.0, 0.2, 3)

    def act(self, obs: np.ndarray, env: gym.Env) -> np.ndarray:
        rng = self._require_rng()
        noise = np.clip(rng.normal(0.0, 1.0, 3), -3.0, 3.0)
        self.state = np.clip(self.state + self.theta * (self.mean - self.state) + self.sigma * noise,
                             -1.5, 1.5)
        return _as_action(*self.state)


def _wrap(angle):
    """Angles folded into [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


class HeuristicPolicy(Policy):
    """A track-following driver: pure pursuit for steering, a curvature speed profile for pedals.

    Reads `env.unwrapped.track` (rows alpha, beta, x, y; consecutive points 3.5 world units apart,
    driven in index order) and `env.unwrapped.car` (hull pose, rear wheel spin). In Box2D the car's
    forward is its local +y axis, i.e. (-sin angle, cos angle) in the world; a positive steer
    action turns the front wheels right (CarRacing passes -steer to the wheel joints, whose angle
    stops at 0.4 rad). Speeds are in world units per second, the scale of `car.hull.linearVelocity`.

    Speed: the fastest speed through each track point is sqrt(lateral_accel / curvature), capped at
    `top_speed`; a backward pass lowers it where the car must brake (at `braking_accel`) for a bend
    ahead. Steering aims at a point on the centre line `lookahead` seconds ahead (pure pursuit),
    with the wheel angle capped to what `grip_accel` allows at the current speed. The CarRacing car
    is rear-wheel drive with a strong engine: full gas at speed spins the rear wheels, which then
    lose their side grip, so gas is cut while they spin faster than `max_wheelspin`. Off the road
    the driver slows to `off_road_speed` and heads back at an angle.
    On env seeds 0..19 it scores 918.6 +- 9.1 (bench/heuristic_score.py), finishing in 650-1000 steps.
    Deterministic: `reset`'s generator is unused.
    """

    name = "heuristic"
    WHEELBASE = 3.24  # front to rear axle of the CarRacing car, world units

    def __init__(self, top_speed: float = 95.0, lateral_accel: float = 160.0,
                 braking_accel: float = 100.0, grip_accel: float = 200.0, lookahead: float = 0.25,
                 min_lookahead: float = 6.0, max_wheelspin: float = 4.0,
                 off_road_speed: float = 25.0):
        self.top_speed = top_speed
        self.off_road_speed = off_road_speed
        self.max_wheelspin = max_wheelspin
        self.grip_accel = grip_accel
        self.lateral_accel = lateral_accel
        self.braking_accel = braking_accel
        self.lookahead = lookahead
        self.min_lookahead = min_lookahead
        self._track_source = None

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        self._track_source = None

    def _plan(self, track) -> None:
        """Cache the centre line and its speed profile for a new track."""
        self._track_source = track
        points = np.asarray([(x, y) for _, _, x, y in track], np.float64)
        seg = np.roll(points, -1, axis=0) - points
        heading = np.arctan2(seg[:, 1], seg[:, 0])
        self.step_length = float(np.median(np.hypot(seg[:, 0], seg[:, 1])))
        turn = np.abs(_wrap(np.roll(heading, -1) - heading))
        # Smooth over +-2 points: one sharp segment alone is not a bend the car must slow for.
        curvature = np.convolve(np.concatenate([turn[-2:], turn, turn[:2]]), np.ones(5) / 5, "valid")
        curvature /= self.step_length
        speed = np.minimum(self.top_speed, np.sqrt(self.lateral_accel / np.maximum(curvature, 1e-6)))
        n = len(points)
        for i in range(2 * n - 1, -1, -1):  # twice round the loop so the wrap-around is settled
            j = i % n
            ahead = speed[(j + 1) % n]
            speed[j] = min(speed[j], math.sqrt(ahead**2 + 2 * self.braking_accel * self.step_length))
        self.points, self.speed = points, speed
        self.index = 0

    def _locate(self, position: np.ndarray) -> int:
        """Index of the nearest centre-line point, searched near the last one (global if lost)."""
        n = len(self.points)
        window = (self.index + np.arange(-10, 40)) % n
        dist = np.hypot(*(self.points[window] - position).T)
        if dist.min() > 20.0:  # off in the grass or spun around: look everywhere
            window = np.arange(n)
            dist = np.hypot(*(self.points - position).T)
        self.index = int(window[np.argmin(dist)])
        return self.index

    def drive(self, env: gym.Env) -> tuple[float, float, float]:
        """(steer, gas, brake) that follow the track at the planned speed."""
        u: Any = env.unwrapped  # CarRacing's own attributes (track, car) are not on gym.Env's type
        if u.track is not self._track_source:
            self._plan(u.track)
        hull = u.car.hull
        position = np.array(hull.position, np.float64)
        forward = np.array([-math.sin(hull.angle), math.cos(hull.angle)])
        right = np.array([math.cos(hull.angle), math.sin(hull.angle)])
        speed = float(np.hypot(*hull.linearVelocity))
        i = self._locate(position)
        n = len(self.points)
        off_track = float(np.hypot(*(self.points[i] - position)))

        # Target on the centre line, interpolated between points so it moves smoothly; when off
        # the road, at least as far along the track as the car is from it, so it rejoins at an angle.
        ahead = max(self.min_lookahead, self.lookahead * speed, off_track / 2) / self.step_length
        k, frac = divmod(ahead, 1.0)
        a, b = self.points[(i + int(k)) % n], self.points[(i + int(k) + 1) % n]
        target = a + frac * (b - a) - position
        alpha = math.atan2(target @ right, target @ forward)  # bearing of the target, right > 0
        if abs(alpha) < math.pi / 2:
            steer = math.atan(2 * self.WHEELBASE * math.sin(alpha) / max(np.hypot(*target), 1.0))
        else:  # target behind (after a spin): pure pursuit's sin(alpha) fades to 0 there
            steer = math.copysign(1.0, alpha)
        # At speed, a wheel angle beyond the grip only makes the car slide: cap it.
        grip_limit = math.atan(self.WHEELBASE * self.grip_accel / max(speed, 1.0) ** 2)
        steer = float(np.clip(steer, -grip_limit, grip_limit))

        # Look a little ahead so the pedals react before the car reaches the slow point.
        want = float(self.speed[(i + np.arange(0, 4)) % n].min())
        if off_track > TRACK_HALF_WIDTH:  # grass grips less and the way back is a turn
            want = min(want, self.off_road_speed)
        if speed < want:
            gas, brake = min(1.0, 0.2 + (want - speed) / 5.0), 0.0
        else:
            gas, brake = 0.0, min(0.8, (speed - want) / 10.0) if speed > want + 2.0 else 0.0
        # Traction control: the engine spins the rear wheels up faster than the road can follow at
        # speed; a spinning wheel has no side grip left and the car spins out. Lift off instead.
        if self._wheelspin(u.car) > self.max_wheelspin:
            gas = 0.0
        return steer, gas, brake

    @staticmethod
    def _wheelspin(car) -> float:
        """How much faster the rear (driven) wheels' rims move than the ground under them."""
        spin = 0.0
        for w in car.wheels[2:4]:
            forward = w.GetWorldVector((0, 1))
            ground = forward[0] * w.linearVelocity[0] + forward[1] * w.linearVelocity[1]
            spin = max(spin, w.omega * w.wheel_rad - ground)
        return spin

    def act(self, obs: np.ndarray, env: gym.Env) -> np.ndarray:
        return _as_action(*self.drive(env))


class RecoveryPolicy(HeuristicPolicy):
    """The heuristic driver with random mistakes, so the data show slides and their recoveries.

    Between mistakes the car drives as `heuristic`, at a top speed drawn per episode. A mistake
    starts with probability `mistake_rate` per step; each kind has its own strength and length:

    - jerk: the wheel yanked to one side (0.3 to full lock) for 3-12 steps;
    - burst: full throttle for 10-40 steps, whatever the bend ahead;
    - hands_off: no steering correction and no pedals for 10-40 steps;
    - brake: a stab of 0.3-1.0 (1.0 locks the wheels) for 5-20 steps.
    """

    name = "recovery"
    MISTAKES = {"jerk": (0.3, 1.0, 3, 12), "burst": (1.0, 1.0, 10, 40),
                "hands_off": (0.0, 0.0, 10, 40), "brake": (0.3, 1.0, 5, 20)}  # strength, steps

    def __init__(self, mistake_rate: float = 1 / 100, **kwargs):
        super().__init__(**kwargs)
        self.mistake_rate = mistake_rate
        self._base_top_speed = self.top_speed

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        self.top_speed = self._base_top_speed * rng.uniform(0.6, 1.0)
        self.mistake: str | None = None
        self.steps_left, self.strength = 0, 0.0

    def act(self, obs: np.ndarray, env: gym.Env) -> np.ndarray:
        rng = self._require_rng()
        steer, gas, brake = self.drive(env)
        if self.steps_left == 0 and rng.uniform() < self.mistake_rate:
            kind = list(self.MISTAKES)[rng.integers(len(self.MISTAKES))]
            self.mistake = kind
            low, high, min_steps, max_steps = self.MISTAKES[kind]
            self.strength = float(rng.choice([-1.0, 1.0]) * rng.uniform(low, high))
            self.steps_left = int(rng.integers(min_steps, max_steps + 1))
        if self.steps_left > 0:
            self.steps_left -= 1
            if self.mistake == "jerk":
                steer = self.strength
            elif self.mistake == "burst":
                gas, brake = 1.0, 0.0
            elif self.mistake == "hands_off":
                steer, gas, brake = 0.0, 0.0, 0.0
            else:
                gas, brake = 0.0, abs(self.strength)
        return _as_action(steer, gas, brake)


class WeavePolicy(HeuristicPolicy):
    """The heuristic driver with a random steering offset, so M can learn what steering does.

    The heuristic steers as the road bends, so in its data the steering is predictable from the
    frame and M can predict the next frame without reading the action: a dream trained on it barely
    responds to steering, and a controller evolved in it never learns to steer. Here an
    Ornstein-Uhlenbeck offset (stationary std `steer_std`, mean reversion `theta` per step, i.e. a
    correlation time of about 1/theta steps) is added to the heuristic's steering. The offset does
    not depend on what the car sees; the heuristic then corrects the swerve, so the car weaves along
    the road at speed (top speed drawn per episode, 0.6 to 1.0 of the heuristic's).
    """

    name = "weave"

    def __init__(self, steer_std: float = 0.3, theta: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.steer_std, self.theta = steer_std, theta
        self._base_top_speed = self.top_speed

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        self.top_speed = self._base_top_speed * rng.uniform(0.6, 1.0)
        self.offset = rng.normal(0.0, self.steer_std)

    def next_offset(self) -> float:
        """One AR(1) step of the offset: o <- (1 - theta) o + sigma eps, with sigma chosen so that
        the stationary std stays `steer_std` (variance sigma^2 / (1 - (1 - theta)^2))."""
        rng = self._require_rng()
        sigma = self.steer_std * math.sqrt(self.theta * (2.0 - self.theta))
        self.offset = (1.0 - self.theta) * self.offset + sigma * rng.normal()
        return self.offset

    def act(self, obs: np.ndarray, env: gym.Env) -> np.ndarray:
        offset = self.next_offset()
        steer, gas, brake = self.drive(env)
        return _as_action(steer + offset, gas, brake)


class ControllerPolicy(Policy):
    """A trained World-Models agent (V, M, C) behind the policy interface.

    `agent` is an agent folder (vae.eqx, mdnrnn.eqx, controller.eqx; e.g. data/pretrained), or an
    object with `reset()` and `act(frame) -> (3,) action` where frame is the 64x64x3 uint8 image V
    sees. With `controller_params` (a flat vector) C comes from them instead of the folder's
    controller.eqx — how CMA-ES scores candidates on real episodes. The agent is deterministic, so
    `reset`'s generator is unused.
    """

    name = "controller"

    def __init__(self, agent=None, controller_params=None, z_mode: str = "sample"):
        if agent is None:
            raise WMError("policy 'controller' needs a trained agent: an agent folder of V, M and C "
                          "checkpoints (e.g. data/pretrained)")
        if isinstance(agent, (str, os.PathLike)):
            from wmlib.agent import Agent

            agent = Agent.load(agent, None if controller_params is None else np.asarray(controller_params, np.float32),
                               z_mode)
        self.agent = agent

    def reset(self, rng: np.random.Generator) -> None:
        super().reset(rng)
        self.agent.reset(rng)

    def act(self, obs: np.ndarray, env: gym.Env) -> np.ndarray:
        return np.asarray(self.agent.act(preprocess(obs)), np.float32).reshape(3)


POLICIES: dict[str, type] = {p.name: p for p in
                             (RandomPolicy, BrownianPolicy, HeuristicPolicy, RecoveryPolicy,
                              WeavePolicy, ControllerPolicy)}


def make_policy(name: str, **kwargs) -> Policy:
    """The policy called `name`, built with `kwargs` (e.g. `agent=` for "controller")."""
    if name not in POLICIES:
        raise WMError(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)
