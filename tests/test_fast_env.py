"""wmlib/CarRacingFast-v3 is stock CarRacing-v3, byte for byte, only faster.

The fast and the stock environment are stepped in lockstep with the same seed and actions; every
observation must have the same bytes and every (reward, terminated, truncated) must be equal.
Drivers: seeded random actions, a smooth scripted drive and the heuristic track follower (on-road
driving, the data-collection case). The remaining tests pin down the facts about pygame that the
fast renderer relies on (see the note in wmlib/fast/render.py).
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pygame
import pytest
from gymnasium.envs.box2d.car_racing import CarRacing

import wmlib
from wmlib.env import FAST_ENV_ID, make_env
from wmlib.fast.render import CarRacingFast, _rotation
from wmlib.policies import make_policy

LOW, HIGH = np.array([-1.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0])


def random_driver(seed: int):
    rng = np.random.default_rng(seed)
    return lambda t, obs, env: rng.uniform(LOW, HIGH).astype(np.float32)


def smooth_driver(t: int, obs, env) -> np.ndarray:
    """Weaving steering, gas in waves, a brake pulse every 4 s: on and off the road, spins."""
    steer = 0.7 * math.sin(t / 35) + 0.3 * math.sin(t / 11)
    gas = max(0.0, math.sin(t / 60)) if t % 200 < 170 else 0.0
    brake = 0.8 if t % 200 >= 185 else 0.0
    return np.array([steer, gas, brake], np.float32)


def heuristic_driver(seed: int):
    policy = make_policy("heuristic")
    policy.reset(np.random.default_rng(seed))
    return lambda t, obs, env: policy.act(obs, env)


def assert_lockstep(stock, fast, seed, driver, steps=1000, render_every=0, setup=None):
    """Reset both with `seed`, drive both with the actions `driver` picks on stock; compare all.

    Returns the number of steps taken and the last reward.
    """
    obs, _ = stock.reset(seed=seed)
    fast_obs, _ = fast.reset(seed=seed)
    assert obs.tobytes() == fast_obs.tobytes(), f"seed {seed}: reset observations differ"
    if setup is not None:
        setup(stock.unwrapped)
        setup(fast.unwrapped)
    for t in range(steps):
        action = driver(t, obs, stock)
        obs, *outcome = stock.step(action)
        fast_obs, *fast_outcome = fast.step(action)
        if obs.tobytes() != fast_obs.tobytes():
            rows, cols = np.nonzero((obs != fast_obs).any(axis=2))
            pytest.fail(f"seed {seed} step {t}: {len(rows)} pixels differ, first at row "
                        f"{rows[0]} column {cols[0]}")
        assert outcome[:3] == fast_outcome[:3], f"seed {seed} step {t}: (r, term, trunc) differ"
        assert outcome[3] == fast_outcome[3], f"seed {seed} step {t}: info differs"
        if render_every and t % render_every == 0:
            frame, fast_frame = stock.render(), fast.render()
            assert frame.shape == (400, 600, 3)
            assert frame.tobytes() == fast_frame.tobytes(), f"seed {seed} step {t}: render differs"
        if outcome[1] or outcome[2]:
            return t + 1, outcome[0]
    return steps, outcome[0]


def pair(**kwargs):
    return make_env(fast=False, **kwargs), make_env(fast=True, **kwargs)


@pytest.mark.slow  # more than 10 s on 2 cores: left out of the quick unit run
@pytest.mark.parametrize("seed, driver", [(0, "random"), (1, "smooth"), (2, "random"),
                                          (3, "smooth"), (4, "random"), (5, "smooth")])
def test_episode_identical(seed, driver):
    stock, fast = pair(render_mode="rgb_array" if seed == 0 else None)
    drive = random_driver(seed) if driver == "random" else smooth_driver
    steps, _ = assert_lockstep(stock, fast, seed, drive, render_every=200 if seed == 0 else 0)
    assert steps == 1000  # neither driver leaves the playfield: full episodes, TimeLimit ends them


@pytest.mark.slow  # more than 10 s on 2 cores: left out of the quick unit run
def test_heuristic_episode_and_next_track_identical():
    stock, fast = pair()
    steps, _ = assert_lockstep(stock, fast, 6, heuristic_driver(6))
    assert steps > 300
    # The same pair on a new track: the fast env's per-track caches must follow the reset.
    assert_lockstep(stock, fast, 7, random_driver(7), steps=150)


def test_playfield_edge_and_termination_identical():
    """Near the playfield's edge the background square stops covering the window, and driving
    off it ends the episode with -100."""
    def move_north(env):
        car = env.car
        for body in [car.hull] + car.wheels:
            body.position = (body.position[0], body.position[1] + 315.0)

    stock, fast = pair()
    gas = lambda t, obs, env: np.array([0.0, 1.0, 0.0], np.float32)  # noqa: E731
    steps, last_reward = assert_lockstep(stock, fast, 0, gas, setup=move_north)
    assert steps < 1000 and last_reward == -100


def test_tall_indicators_identical():
    """Wheels spinning at hundreds of rad/s draw ABS bars above the black bar, into the road."""
    def spin(t, obs, env):
        if t == 40:
            for e in (stock, fast):
                e.unwrapped.car.wheels[2].omega = 650.0
                e.unwrapped.car.wheels[1].omega = -900.0
        return np.array([0.0, 1.0, 0.0], np.float32)

    stock, fast = pair()
    assert_lockstep(stock, fast, 8, spin, steps=80)


@pytest.mark.parametrize("kwargs", [{"domain_randomize": True}, {"continuous": False}])
def test_variants_identical(kwargs):
    stock, fast = pair(**kwargs)
    rng = np.random.default_rng(9)
    if kwargs.get("continuous") is False:
        driver = lambda t, obs, env: int(rng.integers(5))  # noqa: E731
    else:
        driver = random_driver(9)
    assert_lockstep(stock, fast, 9, driver, steps=150)


def test_human_mode_identical():
    """Human mode shows the whole flipped frame; the window must match stock's too."""
    shown = []
    for fast in (False, True):
        env = make_env(render_mode="human", fast=fast)
        env.reset(seed=10)
        for t in range(20):
            obs, *_ = env.step(smooth_driver(t, None, env))
        shown.append((pygame.surfarray.array3d(pygame.display.get_surface()), obs))
        env.close()
    assert np.array_equal(shown[0][0], shown[1][0])
    assert np.array_equal(shown[0][1], shown[1][1])


def test_registration_and_make_env():
    assert wmlib.__version__
    spec, stock_spec = gym.spec(FAST_ENV_ID), gym.spec("CarRacing-v3")
    assert spec.max_episode_steps == stock_spec.max_episode_steps == 1000
    assert spec.reward_threshold == stock_spec.reward_threshold
    env = gym.make(FAST_ENV_ID, lap_complete_percent=0.5)
    assert isinstance(env.unwrapped, CarRacingFast) and env.unwrapped.lap_complete_percent == 0.5
    assert isinstance(make_env().unwrapped, CarRacingFast)
    assert type(make_env(fast=False).unwrapped) is CarRacing


def test_rotation_matches_vector2():
    rng = np.random.default_rng(0)
    right_angles = np.arange(-8, 9) * (math.pi / 2)
    angles = np.concatenate([rng.uniform(-20, 20, 2000), right_angles, right_angles + 3e-7,
                             right_angles - 3e-7, right_angles + 3e-6])
    points = rng.normal(0, 300, (20, 2))
    for angle in angles.tolist():
        cos, sin = _rotation(angle)
        ours = np.stack([cos * points[:, 0] - sin * points[:, 1],
                         sin * points[:, 0] + cos * points[:, 1]], axis=1)
        theirs = [tuple(pygame.math.Vector2(p).rotate_rad(angle)) for p in points.tolist()]
        assert np.array_equal(ours, np.array(theirs)), angle


def test_smoothscale_shrinks_rows_then_columns():
    """smoothscale(S) == smoothscale(smoothscale(S, (w, H))), row by row, for the output sizes."""
    rng = np.random.default_rng(0)
    surface = pygame.Surface((1000, 800))
    for levels in (256, 4):  # noisy and flat (road-like) images
        pixels = rng.integers(0, levels, (1000, 800, 3)) * (255 // (levels - 1))
        pygame.surfarray.blit_array(surface, pixels.astype(np.uint8))
        for size in [(96, 96), (600, 400)]:
            direct = pygame.surfarray.array3d(pygame.transform.smoothscale(surface, size))
            rows = pygame.transform.smoothscale(surface, (size[0], 800))
            two_step = pygame.surfarray.array3d(pygame.transform.smoothscale(rows, size))
            assert np.array_equal(direct, two_step)
            band = pygame.transform.smoothscale(surface.subsurface((0, 700, 1000, 100)),
                                                (size[0], 100))
            assert np.array_equal(pygame.surfarray.array3d(band),
                                  pygame.surfarray.array3d(rows)[:, 700:])


def test_indicator_background_is_rows_700_to_799():
    surface = pygame.Surface((1000, 800))
    surface.fill((200, 100, 50))
    w, h, bar = 1000, 800, 800 / 40
    rect = pygame.draw.polygon(surface, color=(0, 0, 0),
                               points=[(w, h), (w, h - 5 * bar), (0, h - 5 * bar), (0, h)])
    pixels = pygame.surfarray.array3d(surface)
    assert rect == pygame.Rect(0, 700, 1000, 100)
    assert (pixels[:, 700:] == 0).all() and (pixels[:, :700] != 0).all()
