"""Honest seeds: training, selection and test env seeds never meet; the pipeline refuses a preset that
would train or choose on test tracks; selection and off-road targets behave as stated."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmlib.config import PRESETS, SEED_RANGES, CollectConfig, EvolveConfig, check_seeds
from wmlib.data import Episode
from wmlib.dream import make_start_bank, road_starts
from wmlib.env import TRACK_HALF_WIDTH
from wmlib.pipeline import run_pipeline, seed_plan


def test_ranges_are_disjoint_and_the_readme_test_seeds_are_test_seeds():
    ranges = sorted(SEED_RANGES.values(), key=lambda r: r.start)
    assert all(a.stop <= b.start for a, b in zip(ranges, ranges[1:]))
    assert range(0, 100).start in SEED_RANGES["test"] and 99 in SEED_RANGES["test"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_no_preset_trains_or_selects_on_a_test_seed(name):
    """Every block of env seeds a pipeline run draws lies in its use's range; none of the training or
    selection blocks touches the test range."""
    test = SEED_RANGES["test"]
    plan = seed_plan(PRESETS[name])
    assert {use for use, *_ in plan} >= {"training", "test"}
    for use, what, first, count in plan:
        seeds = range(first, first + count)
        assert seeds.start in SEED_RANGES[use] and seeds[-1] in SEED_RANGES[use], (name, what)
        if use != "test":
            assert seeds.stop <= test.start or seeds.start >= test.stop, (name, what)


def test_check_seeds_names_the_setting_and_the_ranges():
    check_seeds("test", 0, 100, "evaluate")
    with pytest.raises(ValueError, match=r"collect.seed: env seeds 0\.\.9 are not all in the training range"):
        check_seeds("training", 0, 10, "collect.seed")
    with pytest.raises(ValueError, match="selection"):
        check_seeds("selection", SEED_RANGES["selection"].stop - 2, 5, "select")  # runs past the range's end


def test_a_preset_that_would_train_on_test_seeds_refuses_to_start(tmp_path):
    smoke = PRESETS["smoke"]
    leaky = dataclasses.replace(smoke, collect=dataclasses.replace(smoke.collect, seed=0))
    with pytest.raises(ValueError, match="collect brownian: env seeds 0..1 are not all in the training range"):
        run_pipeline(leaky, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()  # refused before writing anything
    peeking = dataclasses.replace(smoke, evolve=dataclasses.replace(smoke.evolve, real_seed=5))
    with pytest.raises(ValueError, match="select C"):
        run_pipeline(peeking, tmp_path / "run2")
    # the recipe's commands are read by wm's parser and their seeds checked before anything runs
    recipe = dataclasses.replace(smoke, recipe=("collect --policy weave --episodes 3 --seed 7 --out {run}/data",))
    with pytest.raises(ValueError, match="recipe 1: collect weave: env seeds 7..9 are not all in the training"):
        run_pipeline(recipe, tmp_path / "run3")
    chooser = dataclasses.replace(smoke, recipe=("select --stage {run}/iter_2 --vae V --data D --seed 0",))
    with pytest.raises(ValueError, match="recipe 1: select: env seeds 0..63 are not all in the selection"):
        run_pipeline(chooser, tmp_path / "run4")
    for line, why in (("collect --polcy weave", "recipe line 1 is not a wm command line"),
                      ("export --run {run} --out x", "`wm export` cannot be a recipe step")):
        with pytest.raises(ValueError, match=why):
            run_pipeline(dataclasses.replace(smoke, recipe=(line,)), tmp_path / "run5")
    assert not any((tmp_path / f"run{k}").exists() for k in (3, 4, 5))


def test_collect_plan_per_policy_counts():
    c = CollectConfig(policies=("recovery", "heuristic"), episodes=(5, 2))
    assert c.plan() == [("recovery", 5), ("heuristic", 2)]
    assert CollectConfig(policies=("a", "b"), episodes_per_policy=3).plan() == [("a", 3), ("b", 3)]
    with pytest.raises(ValueError, match="2 policies"):
        CollectConfig(policies=("a", "b"), episodes=(1,)).plan()
    assert EvolveConfig().real_seed in SEED_RANGES["selection"]


def test_offroad_targets_from_car_positions():
    """A straight track along x; the car drives off it sideways at step 3 and leaves the map at the end."""
    track = np.stack([np.arange(0, 100, 3.5), np.zeros(29)], axis=1).astype(np.float32)
    ys = np.array([0, 1, 2, TRACK_HALF_WIDTH + 0.5, TRACK_HALF_WIDTH + 3, 2.0], np.float32)
    xy = np.stack([np.full(6, 50.0), ys], axis=1)
    ep = Episode(frames=np.zeros((6, 64, 64, 3), np.uint8), actions=np.zeros((6, 3), np.float32),
                 rewards=np.array([-0.1, 3, -0.1, -0.1, -0.1, -100], np.float32), terminated=True,
                 truncated=False, policy="x", seed=1, info={"car_xy": xy})
    # target t: where action t left the car (position t+1); the last step left the map (-100)
    np.testing.assert_array_equal(ep.offroad(track), [0, 0, 1, 1, 0, 1])
    no_xy = dataclasses.replace(ep, info={}, terminated=False)
    np.testing.assert_array_equal(no_xy.offroad(track), np.zeros(6))


def test_road_starts_are_episode_starts_and_frames_with_road_ahead():
    off = np.zeros(30)
    off[10] = 1  # the action at frame 10 left the road
    ok = road_starts(off, ahead=5)
    # frame t is refused when an off-road flag lies in t-1 .. t+4: frames 6..11
    expected = np.ones(30, bool)
    expected[6:12] = False
    np.testing.assert_array_equal(ok, expected)
    assert road_starts(np.ones(8), ahead=3).tolist() == [True] + [False] * 7  # the first frame always
    z = [np.zeros((30, 2), np.float32)]
    bank = make_start_bank(z, z, [np.zeros((30, 3), np.float32)], start_ok=[ok])
    np.testing.assert_array_equal(np.asarray(bank.starts), np.flatnonzero(expected))
    with pytest.raises(ValueError, match="no frame is allowed"):
        make_start_bank(z, z, [np.zeros((30, 3), np.float32)], start_ok=[np.zeros(30, bool)])


def test_agent_z_sample_vs_mean():
    """The agent's z: V's mean with z_mode 'mean'; a draw from N(mu, exp(logvar)) by default."""
    from wmlib.agent import agent_step
    from wmlib.controller import Controller
    from wmlib.mdnrnn import MDNRNN

    class TinyV:
        def encode(self, x):
            return jnp.full(2, 0.5), jnp.full(2, 2 * np.log(0.1))

    m = MDNRNN(jax.random.PRNGKey(0), z_dim=2, hidden=4)
    c = Controller(2, 4)
    frame = jnp.zeros((64, 64, 3), jnp.uint8)
    key = jax.random.PRNGKey(1)
    _, _, z_mean = agent_step(TinyV(), m, c, m.initial_state(), frame, key, False)
    np.testing.assert_allclose(z_mean, [0.5, 0.5])
    _, _, z = agent_step(TinyV(), m, c, m.initial_state(), frame, key, True)
    np.testing.assert_allclose(z, 0.5 + 0.1 * jax.random.normal(key, (2,)), rtol=1e-5)
