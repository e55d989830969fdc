"""Branches: the same real state, another steering (rollouts.collect_branches), the pairs M learns the
wheel from (data.branch_pairs) and the branch term of M's loss (mdnrnn.branch_loss)."""
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_mdnrnn import random_encoded
from wmlib.config import RNNConfig
from wmlib.data import branch_pairs, load_branches, load_episode, save_episode, steering_probes
from wmlib.env import make_env, offroad_steps, preprocess, track_of_seed
from wmlib.fidelity import hold_response
from wmlib.mdnrnn import MDNRNN, branch_loss, mdn_mean, train_mdnrnn
from wmlib.rollouts import BRANCH_STEERS, branch_actions, collect, collect_branches

Z, A, H = 4, 3, 16


def loop_branch_loss(model, warm_z, warm_a, z0, act_a, act_b, diff):
    """The branch term written step by step with M's own step(), one pair at a time."""
    total = []
    for b in range(len(z0)):
        state = model.initial_state()
        for z, a in zip(warm_z[b], warm_a[b]):
            state = model.advance(state, jnp.asarray(z), jnp.asarray(a))
        dreams = []
        for acts in (act_a[b], act_b[b]):
            s, z, zs = state, jnp.asarray(z0[b]), []
            for a in acts:
                s, out = model.step(s, z, jnp.asarray(a))
                z = mdn_mean(out)
                zs.append(np.asarray(z))
            dreams.append(np.stack(zs))
        total.append(np.mean((dreams[0] - dreams[1] - diff[b]) ** 2))
    return float(np.mean(total))


def random_pairs(rng, n=3, warm=5, steps=4):
    return (rng.normal(size=(n, warm, Z)), rng.uniform(-1, 1, (n, warm, A)), rng.normal(size=(n, Z)),
            rng.uniform(-1, 1, (n, steps, A)), rng.uniform(-1, 1, (n, steps, A)), rng.normal(size=(n, steps, Z)))


def test_branch_loss_equals_stepping_m_by_hand():
    rng = np.random.default_rng(0)
    model = MDNRNN(jax.random.PRNGKey(1), z_dim=Z, hidden=H, n_mix=2)
    pairs = [np.asarray(x, np.float32) for x in random_pairs(rng)]
    got = float(branch_loss(model, *map(jnp.asarray, pairs)))
    np.testing.assert_allclose(got, loop_branch_loss(model, *pairs), rtol=1e-5)


def test_an_m_blind_to_the_wheel_scores_the_mean_squared_real_difference():
    """With M's weights on the action input at zero, both dreams are the same: the term is mean(diff^2)."""
    rng = np.random.default_rng(2)
    model = MDNRNN(jax.random.PRNGKey(3), z_dim=Z, hidden=H, n_mix=2)
    blind = eqx.tree_at(lambda m: m.weight, model, model.weight.at[Z:Z + A].set(0.0))  # the action rows
    pairs = [np.asarray(x, np.float32) for x in random_pairs(rng)]
    np.testing.assert_allclose(float(branch_loss(blind, *map(jnp.asarray, pairs))), np.mean(pairs[-1] ** 2), rtol=1e-6)
    assert float(branch_loss(model, *map(jnp.asarray, pairs))) != pytest.approx(float(np.mean(pairs[-1] ** 2)))


def test_steering_probes_are_the_first_unmirrored_recovery_episodes():
    names = [f"recovery_{i}.npz" for i in range(10, 0, -1)] + ["recovery_1_mirror.npz", "weave_0.npz"]
    assert steering_probes(names, 3) == ["recovery_1.npz", "recovery_10.npz", "recovery_2.npz"]


@pytest.fixture(scope="module")
def weave_collection(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weave")
    collect("weave", 2, folder, seed=1_000_000, workers=1, max_steps=130, mirror=True, progress=False)
    return folder


def test_branches_replay_the_recorded_state_then_hold_the_wheel(weave_collection, tmp_path):
    out = tmp_path / "branches"
    summary = collect_branches(weave_collection, out, per_episode=2, horizon=12, first=100, last=115, workers=1,
                               varied=False, progress=False)
    assert summary["sources"] == 2 and summary["branches"] == 4
    branches = load_branches(out)
    name, b = sorted(branches.items())[0]
    src = load_episode(weave_collection / name)
    assert b["frames"].shape == (2, 13, 64, 64, 3) and b["actions"].shape == (2, 12, 3)
    for k, t0 in enumerate(b["t0"]):
        assert 100 <= t0 < 115
        np.testing.assert_array_equal(b["frames"][k, 0], src.frames[t0])  # the recorded state
        assert b["actions"][k, 0, 0] in BRANCH_STEERS and np.all(b["actions"][k, :, 0] == b["actions"][k, 0, 0])
        np.testing.assert_array_equal(b["actions"][k, :, 1:], src.actions[t0:t0 + 12, 1:])  # gas and brake as recorded
    # the stock Gymnasium environment, driven by hand with the same actions, sees the same frames
    env = make_env(fast=False)
    obs, _ = env.reset(seed=src.seed)
    t0 = int(b["t0"][0])
    rewards, car_xy = [], []
    for a in np.concatenate([src.actions[:t0], b["actions"][0]]):
        obs, reward, *_ = env.step(a)
        rewards.append(reward)
        car_xy.append(tuple(env.unwrapped.car.hull.position))
    env.close()
    np.testing.assert_array_equal(preprocess(obs), b["frames"][0, -1])
    np.testing.assert_allclose(b["rewards"][0], rewards[t0:], rtol=1e-6)
    np.testing.assert_array_equal(b["offroad"][0], offroad_steps(np.asarray(car_xy[t0:]), track_of_seed(src.seed)))
    assert not np.array_equal(b["frames"][0, -1], src.frames[t0 + 12])  # another steering, another future
    # resumable: a second call drives nothing and draws the same points
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert collect_branches(weave_collection, out, per_episode=2, horizon=12, first=100, last=115, workers=1,
                            varied=False, progress=False)["steps"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_varied_branches_swing_the_wheel_in_held_segments_and_may_floor_the_gas(weave_collection, tmp_path):
    collect_branches(weave_collection, tmp_path, per_episode=8, horizon=8, first=60, last=120, workers=1, seed=4,
                     progress=False)
    branches = load_branches(tmp_path)
    floored = 0
    for name, b in branches.items():
        src = load_episode(weave_collection / name)
        for t0, acts in zip(b["t0"], b["actions"]):
            segments = len(np.flatnonzero(np.diff(acts[:, 0]))) + 1  # equal neighbours may merge two
            assert segments <= 8 and np.all(np.isin(acts[:, 0], np.float32(BRANCH_STEERS)))
            if np.all(acts[:, 1:] == (1.0, 0.0)) and not np.all(src.actions[t0:t0 + 8, 1:] == (1.0, 0.0)):
                floored += 1
            else:
                np.testing.assert_array_equal(acts[:, 1:], src.actions[t0:t0 + 8, 1:])
    assert 0 < floored < 16 and any(len(set(a[:, 0])) > 1 for b in branches.values() for a in b["actions"])


def test_branch_actions_hold_each_steer_for_an_equal_segment():
    recorded = np.tile(np.array([0.1, 0.4, 0.2], np.float32), (7, 1))
    np.testing.assert_array_equal(branch_actions(recorded, [1.0, -0.3], False)[:, 0],
                                  np.float32([1, 1, 1, 1, -0.3, -0.3, -0.3]))
    floored = branch_actions(recorded, [0.0], True)
    assert np.all(floored == np.array([0.0, 1.0, 0.0], np.float32))
    assert np.all(recorded[:, 0] == np.float32(0.1))  # the recording is left alone


def test_a_recording_that_does_not_replay_is_refused_by_name(weave_collection, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    ep = load_episode(weave_collection / "weave_1000000.npz")
    ep.frames[50:] = 0
    save_episode(data / "weave_1000000.npz", ep)
    with pytest.raises(RuntimeError, match=r"weave_1000000\.npz.*another frame"):
        collect_branches(data, tmp_path / "b", per_episode=1, horizon=3, first=52, last=60, workers=1, progress=False)


def test_branch_pairs_hold_each_branch_and_its_mirror_image():
    rng = np.random.default_rng(4)
    T, W, steps = 30, 5, 3
    frames = rng.integers(0, 255, (2, steps + 1, 64, 64, 3), dtype=np.uint8)
    act_b = np.tile(np.array([0.6, 0.5, 0.0], np.float32), (2, steps, 1))
    branches = {"weave_1.npz": {"t0": np.array([10, 20]), "frames": frames, "actions": act_b}}
    encode = lambda f: (f[:, 0, :Z, 0].astype(np.float32), None)  # noqa: E731  row 0, columns 0..Z-1, red
    encoded = {n: {"mu": rng.normal(size=(T, Z)).astype(np.float32), "actions": rng.uniform(-1, 1, (T, A))}
               for n in ("weave_1.npz", "weave_1_mirror.npz")}
    pairs = branch_pairs(encoded, branches, encode, warmup=W)
    assert pairs["diff"].shape == (4, steps, Z) and pairs["warm_z"].shape == (4, W, Z)
    ep, mirror = encoded["weave_1.npz"], encoded["weave_1_mirror.npz"]
    np.testing.assert_allclose(pairs["warm_z"][1], ep["mu"][15:20])
    np.testing.assert_allclose(pairs["act_a"][1], ep["actions"][20:23], rtol=1e-6)
    np.testing.assert_allclose(pairs["diff"][1], ep["mu"][21:24] - frames[1, 1:, 0, :Z, 0])
    np.testing.assert_allclose(pairs["diff"][2], mirror["mu"][11:14] - frames[0, 1:, 0, ::-1][:, :Z, 0])
    assert np.all(pairs["act_b"][2:, :, 0] == -0.6) and np.all(pairs["act_b"][:2, :, 0] == 0.6)
    with pytest.raises(Exception, match="no episode weave_1_mirror.npz"):
        branch_pairs({"weave_1.npz": ep}, branches, encode, warmup=W)


def test_train_mdnrnn_learns_the_branch_term(tmp_path):
    """Pairs whose real difference is the steering difference: the logged branch term falls."""
    rng = np.random.default_rng(5)
    encoded = random_encoded(rng, z_dim=Z)
    warm_z, warm_a, z0, act_a, act_b, _ = (np.asarray(x, np.float32) for x in random_pairs(rng, n=16))
    diff = np.cumsum(act_a[:, :, :1] - act_b[:, :, :1], axis=1) * np.ones(Z, np.float32)  # the wheel moves every z
    pairs = dict(warm_z=warm_z, warm_a=warm_a, z0=z0, act_a=act_a, act_b=act_b, diff=diff)
    cfg = RNNConfig(hidden=H, seq_len=5, batch_size=8, epochs=300, val_episodes=1, w_branch=10.0, learning_rate=3e-3)
    train_mdnrnn(encoded, tmp_path, cfg, vae_id="abc", progress=False, branches=pairs)
    logged = [r["branch"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if "branch" in r]
    assert len(logged) >= 5 and np.mean(logged[-3:]) < 0.5 * np.mean(logged[:3])


def test_hold_response_compares_the_end_and_the_reward_with_reality():
    """An M whose done head never fires and whose reward head says 0.5 every step, on two branches:
    reality leaves the road after 3 steps with the wheel at 1 and never with it straight."""
    H = 6
    model = MDNRNN(jax.random.PRNGKey(6), z_dim=Z, hidden=H * 2, n_mix=2)
    bias = model.head_bias.at[-2].set(0.5).at[-1].set(-10.0)  # reward, done logit
    model = eqx_tree_at(model, (jnp.zeros_like(model.head_weight), bias))
    actions = np.zeros((2, H, A), np.float32)
    actions[0, :, 0] = 1.0
    offroad = np.zeros((2, H), np.float32)
    offroad[0, 3:] = 1.0
    rewards = np.ones((2, H), np.float32)
    branches = {"weave_1.npz": {"t0": np.array([5, 7]), "actions": actions, "rewards": rewards, "offroad": offroad}}
    rng = np.random.default_rng(7)
    encoded = {"weave_1.npz": {"mu": rng.normal(size=(20, Z)).astype(np.float32),
                               "actions": rng.uniform(-1, 1, (20, A)).astype(np.float32)}}
    got = hold_response(model, encoded, branches, warmup=4, samples=3)
    assert got == {"0.0": {"branches": 1, "real_steps": H, "dream_steps": H, "real_reward": H,
                           "dream_reward": pytest.approx(0.5 * H)},
                   "1.0": {"branches": 1, "real_steps": 3, "dream_steps": H, "real_reward": 3,
                           "dream_reward": pytest.approx(0.5 * H)}}
    bias = bias.at[-1].set(10.0)  # the done head fires at once: the dream ends before its first step
    got = hold_response(eqx_tree_at(model, (model.head_weight, bias)), encoded, branches, warmup=4, samples=3)
    assert got["1.0"]["dream_steps"] == 0 and got["1.0"]["dream_reward"] == 0


def eqx_tree_at(model, head):
    """`model` with its head's weight and bias replaced by `head`."""
    return eqx.tree_at(lambda m: (m.head_weight, m.head_bias), model, head)
