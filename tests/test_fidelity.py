"""Dream fidelity: Spearman against scipy, the bend detector on drawn and real roads, reward
calibration by hand, rank agreement with a stub reality, the report and `wm fidelity`'s errors."""

import dataclasses
import json
import shutil

import equinox as eqx
import jax
import numpy as np
import pytest
import scipy.stats

from wmlib import fidelity
from wmlib.cli import main
from wmlib.config import PRETRAINED_DIR, SAMPLE_DIR, EvolveConfig
from wmlib.paths import SHIPPED
from wmlib.controller import n_params
from wmlib.data import Episode, load_episode, save_branches, save_episode
from wmlib.fitness import dream_params
from wmlib.mdnrnn import MDNRNN

GREY, GRASS, LIGHT_GRASS, CAR = (102, 102, 102), (102, 204, 102), (102, 230, 102), (204, 0, 0)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for n in (2, 5, 20, 101):
        a = rng.integers(0, 6, n).astype(float)  # many ties
        b = a + rng.normal(0, 2, n)
        if np.ptp(a) == 0:
            continue
        assert fidelity.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
        np.testing.assert_allclose(fidelity.average_ranks(a), scipy.stats.rankdata(a))
    assert fidelity.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert fidelity.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(fidelity.spearman([1, 1, 1], [1, 2, 3]))


def road_frame(centre) -> np.ndarray:
    """A CarRacing-like frame: grass with lighter squares, a grey road 14 pixels wide whose centre
    column in row r is centre(r) (NaN: no road in that row), the car at rows 50-56."""
    frame = np.empty((64, 64, 3), np.uint8)
    frame[:] = GRASS
    frame[5:20, 40:55] = LIGHT_GRASS
    cols = np.arange(64)
    for r in range(64):
        c = centre(r)
        if not np.isnan(c):
            frame[r, np.abs(cols - c) <= 7] = GREY
    frame[50:57, 30:34] = CAR
    return frame


def test_bend_detector_on_drawn_roads():
    straight = road_frame(lambda r: 32.0)
    slanted = road_frame(lambda r: 32.0 + 0.3 * (46 - r))  # straight, the car at an angle to it
    curved = road_frame(lambda r: 32.0 + 0.012 * max(46 - r, 0) ** 2)
    # a right-angle turn: up the frame, then across it to the left at rows 14..27
    corner = road_frame(lambda r: 32.0 if r >= 20 else np.nan)
    corner[14:28, 0:39] = GREY
    elsewhere = road_frame(lambda r: 6.0)  # a road, but not the one under the car
    frames = np.stack([straight, slanted, curved, corner, elsewhere, curved[:, ::-1]])
    bend, seen = fidelity.bends(frames)
    assert seen.tolist() == [True, True, True, True, False, True]
    assert bend.tolist() == [False, False, True, True, False, True]
    summary = fidelity.bend_fraction(frames)
    assert summary == {"frames": 6, "road_seen": pytest.approx(5 / 6), "bend": pytest.approx(3 / 5)}


def test_bend_detector_agrees_with_track_geometry_on_sample_episodes():
    episodes = [load_episode(SAMPLE_DIR / f"{p}_000007.npz") for p in ("heuristic", "recovery")]
    check = fidelity.bend_agreement(episodes)
    assert check["frames"] >= 400 and check["seen"] > 0.95
    assert check["accuracy"] > 0.8 and check["balanced_accuracy"] > 0.8
    assert 0.2 < check["geometry_bend"] < 0.8  # the sample track has both bends and straights


def episode(policy: str, rewards) -> Episode:
    rewards = np.asarray(rewards, np.float32)
    T = len(rewards)
    return Episode(frames=np.zeros((T, 64, 64, 3), np.uint8), actions=np.zeros((T, 3), np.float32), rewards=rewards,
                   terminated=False, truncated=True, policy=policy, seed=0)


def test_reward_calibration_against_hand_cumsum():
    eps = [episode("heuristic", [1.0, 2.0, 3.0]), episode("heuristic", [0.5, -0.1]), episode("random", [-1.0, 4.0])]
    result = fidelity.reward_calibration(eps, lambda ep: 2 * ep.rewards + 1)  # an M that doubles and adds 1
    h = result["drivers"]["heuristic"]
    assert h["episodes"] == 2 and h["steps"] == 5
    assert h["real_total"] == pytest.approx((6.0 + 0.4) / 2)
    assert h["pred_total"] == pytest.approx((15.0 + 2.8) / 2)
    assert h["real_per_step"] == pytest.approx(6.4 / 5) and h["pred_per_step"] == pytest.approx(17.8 / 5)
    assert result["drivers"]["random"]["pred_total"] == pytest.approx(8.0)
    real, pred = result["curves"]["heuristic"][0]
    np.testing.assert_allclose(real, [1, 3, 6])
    np.testing.assert_allclose(pred, [3, 8, 15])
    with pytest.raises(ValueError, match="shape"):
        fidelity.reward_calibration(eps[:1], lambda ep: ep.rewards[:-1])


def tiny_dream(z_dim=4, hidden=8):
    m = MDNRNN(jax.random.PRNGKey(0), z_dim=z_dim, hidden=hidden, n_mix=2)
    m = eqx.tree_at(lambda m: m.head_bias, m, m.head_bias.at[-1].set(-3.0))  # dreams rarely end
    rng = np.random.default_rng(0)
    encoded = {f"e{i}.npz": {"mu": rng.normal(size=(30, z_dim)).astype(np.float32),
                             "logvar": np.full((30, z_dim), -2.0, np.float32),
                             "actions": rng.uniform(size=(30, 3)).astype(np.float32),
                             "offroad": np.zeros(30, np.float32)} for i in range(2)}
    return m, encoded


def test_rank_agreement_is_one_for_identical_rankings():
    m, encoded = tiny_dream()
    horizons = (5, 20)
    dream = dream_params(m, encoded, EvolveConfig(road_starts=True), horizon=max(horizons))
    means = np.random.default_rng(1).normal(0, 0.5, (12, n_params(4, 8)))
    saved = []

    def reality(sign):  # a "real" score that orders controllers as the dream does at 5 steps (or reversed)
        def score(vec, save_dir):
            saved.append(save_dir)
            return np.full(3, sign * fidelity.dream_scores(dream, vec[None], horizons, 4, progress=False)[0, 0])
        return score

    result = fidelity.rank_agreement(dream, means, reality(1.0), controllers=5, horizons=horizons, rollouts=4,
                                     save_final="last", progress=False)
    assert result["generations"][0] == 1 and result["generations"][-1] == 12 and len(result["generations"]) == 5
    assert np.asarray(result["dream"]).shape == (5, 2) and np.asarray(result["real"]).shape == (5, 3)
    assert result["spearman"]["5"] == pytest.approx(1.0)
    assert saved == [None] * 4 + ["last"]  # only the most evolved controller keeps its real episodes
    result = fidelity.rank_agreement(dream, means, reality(-1.0), controllers=5, horizons=horizons, rollouts=4,
                                     progress=False)
    assert result["spearman"]["5"] == pytest.approx(-1.0)


def test_jerk_events_by_hand():
    steer = np.zeros(120, np.float32)
    steer[60:65] = 0.8     # a jerk at 60
    steer[70:72] = -0.9    # held only 2 steps: not a jerk
    steer[80:84] = 0.2     # too weak
    steer[90:95] = -0.5    # a jerk at 90
    steer[95:99] = -0.5
    np.testing.assert_array_equal(fidelity.jerk_events(steer, start=50, horizon=10), [60, 90])
    np.testing.assert_array_equal(fidelity.jerk_events(steer, start=50, horizon=25), [60, 90])
    np.testing.assert_array_equal(fidelity.jerk_events(steer, start=61, horizon=10), [90])


def test_road_readout_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(500, 6))
    w = np.array([0.5, -1.0, 0.0, 0.25, 2.0, 0.0])
    readout = fidelity.road_readout(mu, mu @ w + 0.3)
    np.testing.assert_allclose(readout, np.r_[w, 0.3], atol=1e-9)
    np.testing.assert_allclose(fidelity.read(readout, mu[:3]), mu[:3] @ w + 0.3, atol=1e-9)


def test_reference_return_by_hand():
    """An M whose reward head ignores h (bias 0.25) and whose dreams never end pays any controller 0.25 a
    step: 20 * 0.25 = 5 over a 20-step dream, the mean of the dreams."""
    m, encoded = tiny_dream()
    n = 3 * m.z_dim * m.n_mix  # the reward column of the head; done is the next one
    flat = eqx.tree_at(lambda m: (m.head_weight, m.head_bias), m,
                       (m.head_weight.at[:, n].set(0.0), m.head_bias.at[n].set(0.25).at[n + 1].set(-50.0)))
    for horizon in (20, 7):
        dream = dream_params(flat, encoded, EvolveConfig(road_starts=True), horizon=horizon)
        assert fidelity.reference_return(dream, rollouts=4) == pytest.approx(0.25 * horizon, rel=1e-5)


def test_steering_response_real_curve_by_hand_and_a_dream_blind_to_actions():
    m, _ = tiny_dream()
    # An M whose LSTM does not read the action inputs (rows z_dim..z_dim+2 of its input weights) dreams
    # the same with and without the jerk: its ratio is 0 exactly.
    blind = eqx.tree_at(lambda m: m.weight, m, m.weight.at[4:7].set(0.0))
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(100, 4)).astype(np.float32)
    actions = np.zeros((100, 3), np.float32)
    actions[60:70, 0] = -0.7
    readout = np.array([1.0, 0.0, -2.0, 0.5, 0.1])
    r = fidelity.steering_response(blind, [{"mu": mu, "actions": actions}], readout, horizon=8, warmup=10,
                                   samples=4)
    assert r["events"] == 1
    reads = mu @ readout[:-1] + readout[-1]
    np.testing.assert_allclose(r["real"], -(reads[61:69] - reads[60]), rtol=1e-5)
    np.testing.assert_allclose(r["dream"], r["dream_straight"], rtol=1e-6)
    assert r["ratio"] == 0.0
    r = fidelity.steering_response(m, [{"mu": mu, "actions": actions}], readout, horizon=8, warmup=10, samples=4)
    assert not np.allclose(r["dream"], r["dream_straight"])  # the untouched M does read the wheel
    with pytest.raises(ValueError, match="no jerk"):
        fidelity.steering_response(m, [{"mu": mu, "actions": np.zeros_like(actions)}], readout)


def short_sample(name: str, policy: str | None = None, steps: int = 130) -> Episode:
    """A sample episode's first `steps` steps (80 after the zoom-in), as driven by `policy`."""
    ep = load_episode(SAMPLE_DIR / name)
    return dataclasses.replace(ep, frames=ep.frames[:steps], actions=ep.actions[:steps], rewards=ep.rewards[:steps],
                               policy=policy or ep.policy, info={"car_xy": ep.info["car_xy"][:steps]})


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """Two short sample episodes encoded by the shipped V, and an evolution history for the shipped M."""
    from wmlib.pipeline import encode

    root = tmp_path_factory.mktemp("fidelity")
    for name in ("heuristic_000007.npz", "random_000007.npz"):
        save_episode(root / "data" / name, short_sample(name))
    jerky = short_sample("recovery_000007.npz")  # two jerks of the wheel, at steps 60 and 90
    steer = jerky.actions[:, 0].copy()
    steer[60:64], steer[90:94] = 0.9, -0.6
    save_episode(root / "data" / "recovery_000007.npz",
                 dataclasses.replace(jerky, actions=np.c_[steer, jerky.actions[:, 1:]].astype(np.float32)))
    encode(root / "data", SHIPPED.vae, mirror=False)
    np.savez(root / "history.npz", mean=np.random.default_rng(0).normal(0, 0.05, (4, n_params())),
             top=np.zeros((4, 1, n_params())), top_return=np.zeros((4, 1)))
    return root, root / "data", root


@pytest.mark.slow  # more than 10 s on 2 cores: left out of the quick unit run
def test_fidelity_report_writes_json_and_figures(sample_run):
    root, data, evolve = sample_run

    def reality(vec, save_dir):  # stands in for real episodes; the last controller "drives" the sample track
        if save_dir is not None:
            save_episode(save_dir / "agent_000007.npz", short_sample("heuristic_000007.npz", "controller"))
        return np.full(2, float(np.sum(vec)))

    H = 6  # one branch of the recovery episode that holds the wheel at 0.6 from step 70, off the road from step 4
    actions = np.tile(np.float32([0.6, 0.3, 0.0]), (1, H, 1))
    save_branches(root / "holds" / "recovery_000007.npz", "recovery_000007.npz", np.array([70]),
                  np.zeros((1, H + 1, 64, 64, 3), np.uint8), actions, np.ones((1, H)), np.float32([[0, 0, 0, 0, 1, 1]]))
    report = fidelity.fidelity_report(PRETRAINED_DIR, data, evolve, EvolveConfig(road_starts=True), root / "out",
                                      controllers=3, dream_rollouts=2, horizons=(5, 10), real_score=reality,
                                      per_driver=1, bend_rollouts=1, progress=False, holds=root / "holds")
    written = json.loads((root / "out" / "fidelity.json").read_text())
    assert written["rank"]["generations"] == [1, 3, 4] and set(written["rank"]["spearman"]) == {"5", "10"}
    assert set(written["bends"]) == {"heuristic (real)", "random (real)", "recovery (real)", "controller (real)",
                                     "controller (dream)"}
    assert set(written["bends"]["heuristic (real)"]) == {"raw", "recon", "geometry"}
    assert written["bends"]["controller (dream)"]["dream"]["frames"] == 3  # 10 dream steps, every 4th
    assert written["bend_detector_vs_geometry"]["frames"] == 160  # heuristic and recovery, 80 frames each
    assert set(written["reward"]) == {"heuristic", "random", "recovery", "controller"}
    assert written["steering"]["events"] == 2 and len(written["steering"]["real"]) == 24
    assert report["reward"] == written["reward"]
    assert list(written["holds"]) == ["0.6"] and written["holds"]["0.6"]["real_steps"] == 4
    assert 0 <= written["holds"]["0.6"]["dream_steps"] <= H
    for name in ("fidelity_rank.png", "fidelity_bends.png", "fidelity_reward.png", "fidelity_steering.png",
                 "fidelity_holds.png"):
        assert (root / "out" / name).stat().st_size > 1000


def test_cli_bad_input_names_the_file(sample_run, tmp_path, capsys):
    root, data, evolve = sample_run
    agent = tmp_path / "agent"
    agent.mkdir()
    shutil.copy(SHIPPED.vae, agent / "vae.eqx")

    def error(*args):
        assert main(["fidelity", *map(str, args)]) == 2
        return capsys.readouterr().err

    assert "has no M (mdnrnn.eqx is missing)" in error("--agent", agent, "--data", data, "--evolve", evolve)
    err = error("--agent", PRETRAINED_DIR, "--data", data, "--evolve", tmp_path)
    assert f"{tmp_path / 'history.npz'} is missing: it holds an evolution run's search means" in err
    err = error("--agent", PRETRAINED_DIR, "--data", tmp_path, "--evolve", evolve)
    assert "has no encodings by V" in err and "would hold V's encoding of every episode" in err
    assert "--horizons must be" in error("--agent", PRETRAINED_DIR, "--data", data, "--evolve", evolve,
                                         "--horizons", "50,x")
    assert not (evolve / "fidelity").exists()  # bad input is refused before any output is written
