"""Driving policies: the interface others rely on, reproducibility, and that the drivers drive."""

from __future__ import annotations

import numpy as np
import pytest

from wmlib.env import make_env, preprocess
from wmlib.policies import (
    POLICIES,
    BrownianPolicy,
    ControllerPolicy,
    RecoveryPolicy,
    WeavePolicy,
    make_policy,
)

NAMES = ("random", "brownian", "heuristic", "recovery", "weave", "controller")
ENV_SEED = 8  # a track the heuristic laps in about 650 steps


class StubAgent:
    """Stands in for a trained V+M+C agent: records what it was shown, steers a fixed amount."""

    def __init__(self):
        self.resets, self.frames = 0, []

    def reset(self, rng=None):
        self.resets += 1

    def act(self, frame):
        self.frames.append(frame)
        return np.array([0.25, 0.5, 0.0])


@pytest.fixture(scope="module")
def env():
    env = make_env()
    yield env
    env.close()


def run_episode(env, policy, policy_seed, steps, env_seed=ENV_SEED):
    """Actions, total reward and the env's fraction of tiles visited after `steps` steps."""
    obs, _ = env.reset(seed=env_seed)
    policy.reset(np.random.default_rng(policy_seed))
    actions, total = [], 0.0
    for _ in range(steps):
        action = policy.act(obs, env)
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        total += reward
        if terminated or truncated:
            break
    u = env.unwrapped
    return np.array(actions), total, u.tile_visited_count / len(u.track)


def build(name):
    return make_policy(name, agent=StubAgent()) if name == "controller" else make_policy(name)


def test_registry_names_and_unknown_name_lists_them():
    assert set(POLICIES) == set(NAMES)
    with pytest.raises(ValueError) as err:
        make_policy("randm")
    for name in NAMES:
        assert name in str(err.value)
    assert "randm" in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_actions_are_float32_in_the_action_space(env, name):
    actions, _, _ = run_episode(env, build(name), policy_seed=1, steps=50)
    assert actions.shape == (50, 3) and actions.dtype == np.float32
    low, high = env.action_space.low, env.action_space.high
    assert np.all(actions >= low) and np.all(actions <= high)


@pytest.mark.parametrize("name", ["random", "brownian", "recovery", "weave"])
def test_same_seed_same_actions_other_seed_other_actions(env, name):
    # Recovery needs a mistake to happen before its actions differ: make them frequent.
    kwargs = {"mistake_rate": 0.1} if name == "recovery" else {}
    first, _, _ = run_episode(env, make_policy(name, **kwargs), policy_seed=3, steps=60)
    again, _, _ = run_episode(env, make_policy(name, **kwargs), policy_seed=3, steps=60)
    other, _, _ = run_episode(env, make_policy(name, **kwargs), policy_seed=4, steps=60)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("name", ["random", "brownian", "recovery", "weave"])
def test_act_before_reset_is_an_error(env, name):
    obs, _ = env.reset(seed=0)
    with pytest.raises(RuntimeError, match="reset"):
        make_policy(name).act(obs, env)


def test_brownian_is_smooth_and_mostly_gas():
    # Brownian ignores the observation, so a long walk needs no environment.
    policy = BrownianPolicy()
    policy.reset(np.random.default_rng(0))
    obs = np.zeros((96, 96, 3), np.uint8)
    actions = np.array([policy.act(obs, None) for _ in range(5000)])
    steps = np.abs(np.diff(actions, axis=0)).max(axis=0)
    assert np.all(steps <= policy.max_increment + 1e-6)
    assert np.all(policy.max_increment <= 0.5)  # a hand on a wheel, not white noise
    assert actions[:, 0].min() < -0.1 and actions[:, 0].max() > 0.1  # steers both ways
    assert actions[:, 1].mean() > 0.2  # keeps moving
    braking = (actions[:, 2] > 0).mean()
    assert 0.0 < braking < 0.4  # brakes sometimes, mostly not


def test_brownian_leaves_the_road(env):
    policy = make_policy("brownian")
    obs, _ = env.reset(seed=ENV_SEED)
    policy.reset(np.random.default_rng(0))
    car, left_road = env.unwrapped.car, False
    for _ in range(400):
        obs, _, terminated, truncated, _ = env.step(policy.act(obs, env))
        left_road |= not any(w.tiles for w in car.wheels)
        if terminated or truncated:
            break
    assert left_road


def test_heuristic_drives_a_lap(env):
    actions, total, visited = run_episode(env, make_policy("heuristic"), policy_seed=0, steps=1000)
    assert total > 600, f"heuristic return {total:.1f} on env seed {ENV_SEED}"
    assert visited > 0.95 and len(actions) < 1000  # finished the lap, not just timed out


def test_heuristic_is_deterministic(env):
    first, _, _ = run_episode(env, make_policy("heuristic"), policy_seed=0, steps=100)
    other, _, _ = run_episode(env, make_policy("heuristic"), policy_seed=1, steps=100)
    np.testing.assert_array_equal(first, other)


def test_recovery_makes_mistakes_but_progresses(env):
    steps = 500
    heuristic, _, _ = run_episode(env, make_policy("heuristic"), policy_seed=0, steps=steps)
    policy = RecoveryPolicy()
    mistakes = []
    obs, _ = env.reset(seed=ENV_SEED)
    policy.reset(np.random.default_rng(0))
    actions = []
    for _ in range(steps):
        actions.append(policy.act(obs, env))
        mistakes.append(policy.steps_left > 0)
        obs, *_ = env.step(actions[-1])
    u = env.unwrapped
    assert sum(mistakes) >= 10
    assert not np.allclose(np.array(actions), heuristic)
    assert u.tile_visited_count / len(u.track) > 0.3  # a heuristic lap is ~0.75 of a track by 500


def test_weave_offset_has_its_stationary_std_and_the_car_progresses(env):
    # The offset is an AR(1) process: its std must be steer_std and its lag-1 autocorrelation 1 - theta,
    # whatever the heuristic does (checked on a long walk without an environment).
    policy = WeavePolicy(steer_std=0.4, theta=0.1)
    policy.reset(np.random.default_rng(0))
    offsets = np.array([policy.next_offset() for _ in range(40_000)])
    assert abs(offsets.std() - 0.4) < 0.03
    assert abs(np.corrcoef(offsets[:-1], offsets[1:])[0, 1] - 0.9) < 0.02
    steps = 500
    heuristic, _, _ = run_episode(env, make_policy("heuristic"), policy_seed=0, steps=steps)
    weave, _, progress = run_episode(env, WeavePolicy(), policy_seed=0, steps=steps)
    assert np.abs(weave[:, 0] - heuristic[:, 0]).mean() > 0.2  # the wheel is really moved
    assert progress > 0.1  # and the heuristic still brings the car along the track (a lap is ~0.75 by 500)


def test_controller_needs_an_agent():
    with pytest.raises(ValueError, match="trained agent") as err:
        make_policy("controller")
    assert "data/pretrained" in str(err.value)


def test_controller_shows_the_agent_preprocessed_frames(env):
    agent = StubAgent()
    policy = ControllerPolicy(agent)
    obs, _ = env.reset(seed=0)
    policy.reset(np.random.default_rng(0))
    action = policy.act(obs, env)
    assert agent.resets == 1
    np.testing.assert_array_equal(agent.frames[0], preprocess(obs))
    assert action.dtype == np.float32 and action.shape == (3,)
    np.testing.assert_allclose(action, [0.25, 0.5, 0.0])
