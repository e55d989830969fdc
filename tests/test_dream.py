"""The dream: batched fitness against a slow loop, episode ends, start modes, the gymnasium wrapper,
driven by a generic gymnax-style rollout."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import wmlib.dream as dream
from wmlib.controller import Controller, from_flat, n_params
from wmlib.dream import (DreamCarRacing, DreamParams, make_start_bank, population_returns, reset, rollout,
                         rollout_trajectory, step)
from wmlib.config import EvolveConfig
from wmlib.fitness import dream_fitness, dream_params
from wmlib.mdnrnn import MDNRNN

Z, H = 4, 8
DONE = 3 * Z * 5 + 1  # index of the done logit in M's head output


def tiny_mdnrnn(done_bias: float = -2.0, seed: int = 0) -> MDNRNN:
    m = MDNRNN(jax.random.PRNGKey(seed), z_dim=Z, hidden=H)
    return eqx.tree_at(lambda m: m.head_bias, m, m.head_bias.at[DONE].set(done_bias))


def tiny_bank(warmup: int = 3, logvar: float = -2.0):
    rng = np.random.default_rng(0)
    lengths = (10, 6)
    return make_start_bank([rng.normal(size=(n, Z)).astype(np.float32) for n in lengths],
                           [np.full((n, Z), logvar, np.float32) for n in lengths],
                           [rng.uniform(size=(n, 3)).astype(np.float32) for n in lengths], warmup=warmup)


class LinearDecoder(eqx.Module):
    """A stand-in for V's decoder: z -> 64x64x3 in [0, 1]."""
    linear: eqx.nn.Linear

    def decode(self, z):
        return jax.nn.sigmoid(self.linear(z)).reshape(64, 64, 3)


@pytest.mark.slow  # more than 10 s on 2 cores: left out of the quick unit run
def test_population_returns_match_a_python_loop():
    params = DreamParams(tiny_mdnrnn(done_bias=-1.0), tiny_bank(), tau=1.2, max_steps=12, start="warm")
    P, R, steps = 3, 2, 15
    flat = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (P, n_params(Z, H)))
    key = jax.random.PRNGKey(2)
    got = np.asarray(population_returns(key, flat, params, R, steps))
    assert got.shape == (P, R)

    reset_j, step_j = eqx.filter_jit(reset), eqx.filter_jit(step)
    want = np.zeros((P, R))
    for p in range(P):
        controller = from_flat(flat[p], Z, H)
        for r, k in enumerate(jax.random.split(key, R)):
            k_reset, k_steps = jax.random.split(k)
            _, state = reset_j(k_reset, params)
            for ks in jax.random.split(k_steps, steps):
                _, state, reward, _, _ = step_j(ks, state, controller(state.z, state.h), params)
                want[p, r] += float(reward)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert len(np.unique(got.round(4))) > 1  # the candidates and repeats really differ


@pytest.mark.slow  # more than 10 s on 2 cores: left out of the quick unit run
def test_done_freezes_the_episode():
    params = DreamParams(tiny_mdnrnn(done_bias=50.0), tiny_bank(), max_steps=100)
    controller = Controller(Z, H, key=jax.random.PRNGKey(3))
    ret, traj = rollout_trajectory(jax.random.PRNGKey(4), controller, params, 6)
    assert np.all(traj.done) and np.all(traj.reward[1:] == 0) and traj.reward[0] != 0
    np.testing.assert_allclose(ret, traj.reward[0], rtol=1e-6)
    np.testing.assert_allclose(rollout(jax.random.PRNGKey(4), controller, params, 6), ret, rtol=1e-6)
    np.testing.assert_array_equal(traj.z[1], traj.z[-1])  # frozen latent after the end

    _, state = reset(jax.random.PRNGKey(5), params)
    obs, state, _, _, _ = step(jax.random.PRNGKey(6), state, jnp.array([0.0, 1.0, 0.0]), params)
    obs2, again, reward, done, _ = step(jax.random.PRNGKey(7), state, jnp.array([1.0, 0.0, 1.0]), params)
    assert bool(done) and bool(again.terminated) and float(reward) == 0 and int(again.t) == 1
    np.testing.assert_array_equal(obs, obs2)


def test_a_dream_that_does_not_end_on_done_runs_to_max_steps():
    """ends=False: the done head fires at every step, yet the dream goes on and earns M's reward each
    step, exactly as an M whose done head never fires (the same keys, so the same latents)."""
    firing, silent = tiny_mdnrnn(done_bias=50.0), tiny_mdnrnn(done_bias=-50.0)
    controller = Controller(Z, H, key=jax.random.PRNGKey(3))
    ret, traj = rollout_trajectory(jax.random.PRNGKey(4), controller, DreamParams(firing, tiny_bank(), max_steps=6,
                                                                                  ends=False), 6)
    want, ref = rollout_trajectory(jax.random.PRNGKey(4), controller, DreamParams(silent, tiny_bank(), max_steps=6), 6)
    np.testing.assert_array_equal(traj.done, [False] * 5 + [True])
    assert np.all(traj.reward != 0)
    np.testing.assert_allclose(traj.reward, ref.reward, rtol=1e-6)
    np.testing.assert_allclose(ret, want, rtol=1e-6)


def test_an_ensemble_scores_each_candidate_in_the_dream_of_its_worst_m():
    rng = np.random.default_rng(0)
    encoded = {f"e{i}.npz": {"mu": rng.normal(size=(30, Z)).astype(np.float32),
                             "logvar": np.full((30, Z), -2.0, np.float32),
                             "actions": rng.uniform(size=(30, 3)).astype(np.float32),
                             "offroad": np.zeros(30, np.float32)} for i in range(2)}
    cfg = EvolveConfig(repeats=3, episode_len=5)
    ms = (tiny_mdnrnn(seed=0), tiny_mdnrnn(seed=5))
    x = jnp.asarray(rng.normal(0, 0.5, (8, n_params(Z, H))), jnp.float32)
    key = jax.random.PRNGKey(2)
    each = [np.asarray(population_returns(key, x, dream_params(m, encoded, cfg), 3, 5)) for m in ms]
    worst = np.argmin([e.mean(axis=1) for e in each], axis=0)
    assert set(worst) == {0, 1}  # each M is the pessimist for some candidate
    got = np.asarray(dream_fitness(ms[0], encoded, cfg, ms[1:])(key, x))
    np.testing.assert_allclose(got, [each[w][p] for p, w in enumerate(worst)], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dream_fitness(ms[0], encoded, cfg)(key, x)), each[0], rtol=1e-5)


def test_max_steps_ends_the_episode():
    params = DreamParams(tiny_mdnrnn(done_bias=-50.0), tiny_bank(), max_steps=5)
    _, traj = rollout_trajectory(jax.random.PRNGKey(8), Controller(Z, H), params, 8)
    np.testing.assert_array_equal(traj.done, [False] * 4 + [True] * 4)
    assert np.all(traj.reward[:5] != 0) and np.all(traj.reward[5:] == 0)


def test_start_modes():
    m = tiny_mdnrnn()
    bank = tiny_bank(warmup=3, logvar=-40.0)  # a near-zero posterior spread: z = mu
    _, zero = reset(jax.random.PRNGKey(0), DreamParams(m, start="zero"))
    assert not np.any(zero.z) and not np.any(zero.h) and not np.any(zero.c)

    for s, history in ((7, [4, 5, 6]), (11, [10])):  # frame 11 is the second frame of episode 2
        one = eqx.tree_at(lambda b: b.starts, bank, jnp.array([s], jnp.int32))
        _, real = reset(jax.random.PRNGKey(1), DreamParams(m, one, start="real"))
        np.testing.assert_allclose(real.z, bank.mu[s], atol=1e-6)
        assert not np.any(real.h)
        _, warm = reset(jax.random.PRNGKey(1), DreamParams(m, one, start="warm"))
        state = m.initial_state()
        for i in history:
            state = m.advance(state, bank.mu[i], bank.action[i])
        np.testing.assert_allclose(warm.z, bank.mu[s], atol=1e-6)
        np.testing.assert_allclose(warm.h, state[0], atol=1e-6)
        np.testing.assert_allclose(warm.c, state[1], atol=1e-6)


def test_params_are_checked():
    m = tiny_mdnrnn()
    with pytest.raises(ValueError, match="valid modes: warm, real, zero"):
        DreamParams(m, tiny_bank(), start="cold")
    with pytest.raises(ValueError, match="needs a StartBank"):
        DreamParams(m, None, start="warm")
    with pytest.raises(ValueError, match="z_dim"):
        DreamParams(MDNRNN(jax.random.PRNGKey(0), z_dim=5, hidden=H), tiny_bank())
    with pytest.raises(ValueError, match="z_dim=4, hidden=8"):
        rollout(jax.random.PRNGKey(0), Controller(32, 256), DreamParams(m, tiny_bank()), 3)


def test_gymnasium_env_passes_check_env_and_renders():
    params = DreamParams(tiny_mdnrnn(done_bias=-50.0), tiny_bank(), max_steps=4)
    decoder = LinearDecoder(eqx.nn.Linear(Z, 64 * 64 * 3, key=jax.random.PRNGKey(0)))
    env = DreamCarRacing(params, vae=decoder, render_mode="rgb_array")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    # allowed: no registered spec, and the unbounded z part of the observation (a Gaussian sample)
    problems = [str(w.message) for w in caught if "spec" not in str(w.message) and "infinity" not in str(w.message)]
    assert not problems, problems

    obs, _ = env.reset(seed=0)
    assert obs.shape == (Z + H,) and obs.dtype == np.float32 and env.observation_space.contains(obs)
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    ends = [env.step(np.array([0.0, 1.0, 0.0], np.float32))[2:4] for _ in range(4)]
    assert ends == [(False, False)] * 3 + [(False, True)]
    for bad in ([0.0, 1.5, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.0], [np.nan, 0.0, 0.0]):
        with pytest.raises(ValueError, match="outside the CarRacing action space"):
            env.step(np.array(bad, np.float32))
    with pytest.raises(ValueError, match="needs a vae"):
        DreamCarRacing(params, render_mode="rgb_array")


def test_dream_dropout_draws_one_mask_per_dream_and_keeps_it():
    """dropout 0: masks of ones and the same start as before; dropout > 0: each dream its own mask,
    the same at every step, and the dreams differ from the undropped ones."""
    m, bank = tiny_mdnrnn(), tiny_bank(warmup=3)
    plain, dropped = DreamParams(m, bank, max_steps=20), DreamParams(m, bank, max_steps=20, dropout=0.3)
    key = jax.random.PRNGKey(4)
    (_, a), (_, b) = reset(key, plain), reset(key, dropped)
    assert all(bool(jnp.all(x == 1.0)) for x in a.mask)
    np.testing.assert_allclose(a.z, b.z)  # the start does not depend on the dropout rate
    _, other = reset(jax.random.PRNGKey(5), dropped)
    assert not np.array_equal(b.mask[1], other.mask[1])
    state = b
    for k in jax.random.split(key, 5):
        _, state, *_ = step(k, state, jnp.zeros(3), dropped)
        assert np.array_equal(state.mask[1], b.mask[1])
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        DreamParams(m, bank, dropout=1.0)


def gymnax_rollout(env, env_params, policy, key, steps):
    """A rollout as gymnax-style code writes it, knowing nothing of the dream: `env.reset(key, params)`,
    then one lax.scan over `env.step(key, state, action, params)` with one key per step; the return
    counts rewards until the first done. Returns (return, rewards per step)."""
    k_reset, k_steps = jax.random.split(key)
    obs, state = env.reset(k_reset, env_params)

    def body(carry, k):
        obs, state, ret, alive = carry
        obs, state, reward, done, _ = env.step(k, state, policy(obs), env_params)
        return (obs, state, ret + alive * reward, alive * (1.0 - done)), reward

    (_, _, ret, _), rewards = jax.lax.scan(body, (obs, state, 0.0, 1.0), jax.random.split(k_steps, steps))
    return ret, rewards


def test_a_generic_gymnax_rollout_drives_the_dream():
    """The module's reset/step have gymnax's signatures: a generic rollout, jitted and vmapped over a
    population and repeats, gives the dream's own returns for the same keys (the episodes end within
    the rollout: max_steps 12 < 15 steps)."""
    params = DreamParams(tiny_mdnrnn(done_bias=-1.0), tiny_bank(), tau=1.2, max_steps=12, start="warm")
    P, R, steps = 3, 2, 15
    flat = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (P, n_params(Z, H)))
    key = jax.random.PRNGKey(2)

    def rollout_of(vec, k):
        controller = from_flat(vec, Z, H)
        return gymnax_rollout(dream, params, lambda obs: controller(obs[:Z], obs[Z:]), k, steps)

    keys = jax.random.split(key, R)
    got, rewards = jax.jit(jax.vmap(lambda vec: jax.vmap(lambda k: rollout_of(vec, k))(keys)))(flat)
    assert got.shape == (P, R) and rewards.shape == (P, R, steps)
    np.testing.assert_allclose(got, population_returns(key, flat, params, R, steps), rtol=1e-5, atol=1e-5)
    for p in range(P):
        ret, traj = rollout_trajectory(keys[1], from_flat(flat[p], Z, H), params, steps)
        np.testing.assert_allclose(got[p, 1], ret, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rewards[p, 1], traj.reward, rtol=1e-5, atol=1e-5)
    assert len(np.unique(np.asarray(got).round(4))) > 1
