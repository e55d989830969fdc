"""CarRacing-v3 construction and the paper's frame preprocessing.

CarRacing-v3 observations are 96x96x3 uint8; the bottom 12 rows are the indicator bar (speed,
ABS, steering, gyro). V sees only the road: rows 0..83 are kept and resized to 64x64 with
cv2.INTER_AREA (an average over each source area, no aliasing). Frames stay uint8 on disk.
"""

from __future__ import annotations

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame draws off-screen; no display needed

import cv2
import gymnasium as gym
import numpy as np

OBS_SHAPE = (96, 96, 3)
FRAME_SHAPE = (64, 64, 3)
CROP_ROWS = 84  # rows 0..83 show the road; rows 84..95 are the indicator bar
ENV_ID = "CarRacing-v3"


def make_env(render_mode: str | None = None, **kwargs) -> gym.Env:
    """The stock Gymnasium CarRacing-v3 (continuous actions: steer, gas, brake)."""
    return gym.make(ENV_ID, render_mode=render_mode, **kwargs)


def preprocess(obs: np.ndarray) -> np.ndarray:
    """One 96x96x3 uint8 observation -> 64x64x3 uint8 frame (bar cropped, INTER_AREA resize)."""
    obs = np.asarray(obs)
    if obs.shape != OBS_SHAPE or obs.dtype != np.uint8:
        raise ValueError(f"preprocess expects a CarRacing observation of shape {OBS_SHAPE} uint8, "
                         f"got shape {obs.shape} {obs.dtype}")
    return cv2.resize(obs[:CROP_ROWS], FRAME_SHAPE[:2][::-1], interpolation=cv2.INTER_AREA)
