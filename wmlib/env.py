"""CarRacing-v3 construction and the paper's frame preprocessing.

CarRacing-v3 observations are 96x96x3 uint8; the bottom 12 rows are the indicator bar (speed,
ABS, steering, gyro). V sees only the road: rows 0..83 are kept and resized to 64x64 with
cv2.INTER_AREA (an average over each source area, no aliasing). Frames stay uint8 on disk.

`make_env` builds, by default, `wmlib.fast.render.CarRacingFast`: the same environment with the
same observation bytes, rewards and terminations, about twice as fast (a faster renderer; see its
module). `make_env(fast=False)` gives the stock Gymnasium environment.
"""

from __future__ import annotations

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame draws off-screen; no display needed

import cv2
import gymnasium as gym
import numpy as np
from gymnasium.envs.box2d.car_racing import TRACK_WIDTH

OBS_SHAPE = (96, 96, 3)
FRAME_SHAPE = (64, 64, 3)
CROP_ROWS = 84  # rows 0..83 show the road; rows 84..95 are the indicator bar
ENV_ID = "CarRacing-v3"
FAST_ENV_ID = "wmlib/CarRacingFast-v3"  # registered in wmlib/__init__.py
TRACK_HALF_WIDTH = TRACK_WIDTH  # world units: the road spans +-TRACK_WIDTH around its centre line
# CarRacing's action space: steer in [-1, 1] (positive steers right), gas and brake in [0, 1]
ACTION_LOW = np.array([-1.0, 0.0, 0.0], np.float32)
ACTION_HIGH = np.array([1.0, 1.0, 1.0], np.float32)


def make_env(render_mode: str | None = None, fast: bool = True, **kwargs) -> gym.Env:
    """CarRacing-v3 (continuous actions: steer, gas, brake) with the usual TimeLimit(1000) wrappers.

    fast=True gives `wmlib.fast.render.CarRacingFast` (same observations, rewards and terminations,
    about twice the steps per second); fast=False the stock Gymnasium environment. kwargs go to the
    constructor (lap_complete_percent, domain_randomize, continuous, ...).
    """
    return gym.make(FAST_ENV_ID if fast else ENV_ID, render_mode=render_mode, **kwargs)


def track_of_seed(seed: int) -> np.ndarray:
    """The centre line (N, 2) of the track that env seed `seed` generates (the real track, no driving)."""
    env = make_env()
    env.reset(seed=seed)
    track = np.array([(x, y) for _, _, x, y in env.unwrapped.track], np.float32)  # type: ignore[attr-defined]
    env.close()
    return track


def offroad_steps(car_xy: np.ndarray, track_xy: np.ndarray) -> np.ndarray:
    """(T,) bool: the car's centre is farther from the track's centre line than the road's half width."""
    d2 = ((car_xy[:, None, :] - track_xy[None, :, :]) ** 2).sum(-1).min(axis=1)
    return np.sqrt(d2) > TRACK_HALF_WIDTH


def preprocess(obs: np.ndarray) -> np.ndarray:
    """One 96x96x3 uint8 observation -> 64x64x3 uint8 frame (bar cropped, INTER_AREA resize)."""
    obs = np.asarray(obs)
    if obs.shape != OBS_SHAPE or obs.dtype != np.uint8:
        raise ValueError(f"preprocess expects a CarRacing observation of shape {OBS_SHAPE} uint8, "
                         f"got shape {obs.shape} {obs.dtype}")
    return cv2.resize(obs[:CROP_ROWS], FRAME_SHAPE[:2][::-1], interpolation=cv2.INTER_AREA)
