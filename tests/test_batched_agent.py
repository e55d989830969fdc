"""Agents driven K episodes at a time in lockstep give exactly the episodes of one at a time, and
real-environment fitness ends an episode early once the car stops finding new tiles."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from wmlib.agent import AgentBatch
from wmlib.config import SEED_RANGES
from wmlib.controller import Controller, n_params, save_controller
from wmlib.data import episode_files, load_episode
from wmlib.evaluate import evaluate
from wmlib.fitness import RealFitness
from wmlib.mdnrnn import MDNRNN, save_mdnrnn
from wmlib.rollouts import ZOOM_STEPS, EpisodeSpec, out_of_patience, run_agent_episodes, run_episode, split_blocks
from wmlib.vae import ConvVAE, save_vae

Z, H = 8, 16
# C's flat vector with zero weights and gas bias -10: the car stands still (gas (tanh(-10) + 1) / 2 = 0)
PARKED = np.zeros(n_params(Z, H), np.float32)
PARKED[-2] = -10.0


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory):
    """A random agent: V with z_dim 8, M with 16 hidden units, C with N(0, 0.1^2) weights."""
    folder = tmp_path_factory.mktemp("agent")
    save_vae(folder / "vae.eqx", ConvVAE(jax.random.PRNGKey(0), z_dim=Z))
    save_mdnrnn(folder / "mdnrnn.eqx", MDNRNN(jax.random.PRNGKey(1), z_dim=Z, hidden=H))
    save_controller(folder / "controller.eqx", Controller(Z, H, key=jax.random.PRNGKey(2)))
    return folder


def spec(agent_dir, seed, max_steps, z_mode="sample", params=None, patience=None):
    kwargs = {"agent": str(agent_dir), "z_mode": z_mode}
    if params is not None:
        kwargs["controller_params"] = np.asarray(params, np.float32).tolist()
    return EpisodeSpec("controller", seed, max_steps, policy_kwargs=kwargs, patience=patience)


def assert_same_episode(a, b):
    np.testing.assert_array_equal(a.actions, b.actions)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.rewards, b.rewards)
    assert (a.terminated, a.truncated, a.seed) == (b.terminated, b.truncated, b.seed)


def test_lockstep_episodes_equal_one_at_a_time(agent_dir):
    """Episodes of different lengths (the batch shrinks 3 -> 2 -> 1 as they end), one with its own
    controller: every frame, action and reward equals the episode driven alone."""
    own = np.random.default_rng(0).normal(0.0, 0.3, n_params(Z, H))
    specs = [spec(agent_dir, 3, 30), spec(agent_dir, 4, 20, params=own), spec(agent_dir, 5, 8)]
    batched = run_agent_episodes(specs)
    assert [len(ep) for ep in batched] == [30, 20, 8]
    for s, ep in zip(specs, batched):
        assert_same_episode(ep, run_episode(s))
    # z is sampled per episode: V's mean instead changes the actions (so the key stream was tested)
    means = run_agent_episodes([spec(agent_dir, 3, 30, z_mode="mean"), spec(agent_dir, 5, 8, z_mode="mean")])
    assert not np.array_equal(means[0].actions, batched[0].actions)
    assert_same_episode(means[1], run_episode(spec(agent_dir, 5, 8, z_mode="mean")))


def test_evaluate_scores_and_saved_episodes_equal_one_at_a_time(agent_dir, tmp_path):
    result = evaluate(agent_dir, 3, seed=7, workers=1, max_steps=12, batch=2, save_dir=tmp_path, progress=False)
    alone = [run_episode(spec(agent_dir, 7 + i, 12)) for i in range(3)]
    assert set(result) == {"mean", "std", "episodes", "seed", "scores", "frames", "failed"}
    assert result["scores"] == [ep.total_reward for ep in alone]
    assert result["frames"] == 36 and result["failed"] == []
    saved = [load_episode(p) for p in episode_files(tmp_path)]
    for ep, ref in zip(sorted(saved, key=lambda e: e.seed), alone):
        np.testing.assert_array_equal(ep.actions, ref.actions)


def test_out_of_patience_counts_steps_without_a_new_tile_after_the_zoom():
    no_tile = [-0.1] * (ZOOM_STEPS + 20)
    assert out_of_patience(no_tile, 20)
    assert not out_of_patience(no_tile[:-1], 20)  # the zoom-in's steps do not count
    assert not out_of_patience(no_tile[:-1] + [3.2], 20)  # a new tile starts the count again
    assert not out_of_patience(no_tile, None)


def test_real_fitness_ends_episodes_without_new_tiles_and_counts_frames_saved(agent_dir):
    """A parked car finds no tile after the start: its episodes end after ZOOM_STEPS + patience
    steps, with the return of the full episode's first steps; a driving candidate is scored as
    driven alone with the same patience."""
    driving = np.random.default_rng(1).normal(0.0, 0.3, n_params(Z, H))
    fitness = RealFitness(agent_dir, repeats=2, max_steps=100, workers=1, batch=3, patience=20)
    key = jax.random.PRNGKey(5)
    returns = fitness(key, np.stack([PARKED, driving]))
    seeds = fitness.seeds(key)
    assert len(seeds) == 2 and all(s in SEED_RANGES["training"] for s in seeds)  # C trains on training tracks
    alone = [[run_episode(spec(agent_dir, s, 100, params=p, patience=20)) for s in seeds]
             for p in (PARKED, driving)]
    np.testing.assert_array_equal(returns, [[ep.total_reward for ep in row] for row in alone])
    for r, ep in enumerate(alone[0]):
        assert len(ep) == ZOOM_STEPS + 20 and ep.truncated
        full = run_episode(spec(agent_dir, seeds[r], 100, params=PARKED))
        np.testing.assert_array_equal(ep.rewards, full.rewards[:len(ep)])
    assert fitness.frames == sum(len(ep) for row in alone for ep in row)
    gave_up = [ep for row in alone for ep in row if out_of_patience(ep.rewards, 20)]
    assert fitness.frames_saved == sum(100 - len(ep) for ep in gave_up) >= 2 * 30


def test_blocks_and_clear_errors(agent_dir):
    blocks = split_blocks(list(range(100)), 16, 2)
    assert sum(blocks, []) == list(range(100)) and max(map(len, blocks)) <= 16
    assert split_blocks(list(range(8)), 16, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="batch"):
        split_blocks([1], 0, 1)
    with pytest.raises(ValueError, match="one agent folder and z_mode"):
        run_agent_episodes([spec(agent_dir, 0, 5), spec(agent_dir, 1, 5, z_mode="mean")])
    with pytest.raises(ValueError, match=r"controller_params\[0\]: expected a flat controller of 75 parameters"):
        AgentBatch.load(agent_dir, [np.zeros(5), None], [np.random.default_rng(0)] * 2)
    with pytest.raises(ValueError, match="patience"):
        RealFitness(agent_dir, repeats=1, patience=0)
