"""Widgets: drive them by setting values, as a learner's clicks would, and check the picture changes.

The decoder here is a fixed random linear map from z to a 64x64x3 image, so every change of z shows.
"""

import jax
import numpy as np
import pytest

from wmlib import viz, widgets
from wmlib.controller import Controller
from wmlib.data import Episode
from wmlib.mdnrnn import MDNRNN

Z = 4
PROJ = np.random.default_rng(0).normal(size=(Z, 64 * 64 * 3)).astype(np.float32)


def decode(zs):
    return 1 / (1 + np.exp(-np.asarray(zs) @ PROJ)).reshape(-1, 64, 64, 3)


def encode(frames):
    return np.asarray(frames, np.float32).reshape(len(frames), -1)[:, :Z] / 255.0


@pytest.fixture(scope="module")
def mdnrnn():
    return MDNRNN(jax.random.PRNGKey(0), z_dim=Z, hidden=8)


@pytest.fixture(scope="module")
def episode():
    rng = np.random.default_rng(1)
    return {"mu": rng.normal(size=(40, Z)).astype(np.float32),
            "actions": rng.uniform(0, 1, size=(40, 3)).astype(np.float32),
            "frames": rng.integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)}


def test_reconstruction_browser_follows_sliders(episode):
    eps = [episode["frames"], episode["frames"][::-1]]
    w = widgets.ReconstructionBrowser(eps, reconstruct=lambda f: 255 - f)
    before = w.image.value
    w.frame.value = 5
    assert w.image.value != before
    np.testing.assert_array_equal(w.render()[:, :192], viz.upscale(eps[0][5], 3))
    w.episode.value = 1
    np.testing.assert_array_equal(w.render()[:, :192], viz.upscale(eps[1][5], 3))


def test_latent_scrubber_sliders_buttons_and_kl_order(episode):
    kl = np.array([0.1, 2.0, 0.0, 1.0])
    w = widgets.LatentScrubber(decode, kl, episode["frames"], encode, n_sliders=3)
    assert w.order == [1, 3, 0]  # most informative first; the dead dimension 2 gets no slider
    start = w.image.value
    w.sliders[0].value = 2.5
    assert w.z[1] == 2.5 and w.image.value != start
    after_slider = w.image.value
    w.random.click()
    assert w.image.value != after_slider
    w.frame.value = 7
    w.from_frame.click()
    np.testing.assert_allclose(w.z, encode(episode["frames"][7:8])[0], rtol=1e-6)
    w.reset.click()
    assert not w.z.any() and w.image.value == start


def test_dream_player_play_tau_and_steering(mdnrnn, episode):
    w = widgets.DreamPlayer(mdnrnn, decode, episode["mu"], episode["actions"], start=10, max_steps=30)
    first = w.image.value
    w.step.value = 20
    at_20 = w.image.value
    assert at_20 != first  # time moves the dream
    w.tau.value = 0.3
    assert w.image.value != at_20  # a new temperature, a new dream
    w.tau.value = 1.0
    assert w.image.value == at_20  # same tau, same random numbers: the same dream again
    z_before = np.asarray(w.traj.z).copy()
    w.step.value = 5
    w.steer.value = -1.0  # steering from step 5 on changes the course after it, not before
    z_after = np.asarray(w.traj.z)
    np.testing.assert_array_equal(z_after[:6], z_before[:6])
    assert not np.allclose(z_after[7:], z_before[7:])


def test_dream_player_controller_drives(mdnrnn, episode):
    c = Controller(Z, 8, key=jax.random.PRNGKey(3))
    w = widgets.DreamPlayer(mdnrnn, decode, episode["mu"], episode["actions"], controller=c, max_steps=10)
    actions = np.asarray(w.traj.action)
    assert w.driver.value == "controller" and not np.allclose(actions, actions[0])
    w.driver.value = "you"
    np.testing.assert_allclose(np.asarray(w.traj.action), np.tile([0.0, 0.3, 0.0], (10, 1)))


def test_real_vs_dream_uses_the_real_actions(mdnrnn, episode):
    out = viz.real_vs_dream(mdnrnn, decode, episode["mu"], episode["actions"], start=5, steps=10,
                            key=jax.random.PRNGKey(0))
    assert out["frames"].shape == (11, 64, 64, 3) and out["reward"].shape == (10,)
    np.testing.assert_array_equal(out["frames"][0], viz.to_uint8(decode(episode["mu"][5:6])[0]))
    near_end = viz.real_vs_dream(mdnrnn, decode, episode["mu"], episode["actions"], start=35, steps=10,
                                 key=jax.random.PRNGKey(0))
    assert near_end["reward"].shape == (5,)  # clipped at the episode's end


def test_episode_scrubber_frames_map_reward_and_actions(episode):
    T = 12
    panels = {k: episode["frames"][:T] for k in ("frame", "recon", "dream")}
    panels["reward_pred"] = np.linspace(0, 1, T)
    angles = np.linspace(0, 2 * np.pi, 50, endpoint=False)
    track = 100 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    ep = Episode(frames=episode["frames"][:T], actions=episode["actions"][:T], rewards=np.zeros(T, np.float32),
                 terminated=False, truncated=True, policy="controller", seed=0, info={"car_xy": track[:T]})
    w = widgets.EpisodeScrubber(panels, ep, track)
    before, plot_before = w.image.value, w.plot.value
    w.step.value = 6
    assert w.image.value != before and w.plot.value != plot_before
    frames = w.render_frames()
    np.testing.assert_array_equal(frames[:, :192], viz.upscale(episode["frames"][6], 3))  # the real frame first
    np.testing.assert_array_equal(frames[:, -192:], viz.track_map(track, track[:T], 6, size=192))  # the map last


def test_real_dream_player_start_and_step(mdnrnn, episode):
    panels = {"frame": episode["frames"], "recon": episode["frames"][::-1], "z": episode["mu"]}
    w = widgets.RealDreamPlayer(mdnrnn, decode, panels, episode["actions"], steps=10)
    assert (w.start.max, w.step.max) == (29, 10)  # a whole dream fits before the episode's last frame
    first = w.image.value
    w.start.value = 20
    at_20 = w.render()
    assert w.image.value != first
    dream = viz.real_vs_dream(mdnrnn, decode, episode["mu"], episode["actions"], 20, 10, w.key)
    w.step.value = 7
    np.testing.assert_array_equal(w.render(), viz.panel_row(
        [episode["frames"][27], episode["frames"][::-1][27], dream["frames"][7]]))  # same actions, same dream
    assert not np.array_equal(w.render(), at_20)


def test_mdn_temperature_redraws_at_each_tau():
    x = np.linspace(-1, 1, 50)
    xs = np.linspace(-1, 1, 30)
    w = widgets.MDNTemperature(x, x**3, xs, sample=lambda tau: np.sqrt(tau) * np.sin(7 * xs))
    at_1 = w.image.value
    w.tau.value = 0.3
    assert w.image.value != at_1
    w.tau.value = 1.0
    assert w.image.value == at_1  # the same tau, the same picture


def test_generation_browser_follows_the_slider():
    rng = np.random.default_rng(0)
    hist = {"mean": rng.normal(size=(5, 3)), "top_return": np.sort(rng.normal(size=(5, 4)))[:, ::-1]}
    seen = []

    def dream(flat):  # a "dream" whose frames are as bright as the first parameter is high
        seen.append(flat)
        return np.full((20, 8, 8, 3), 1 / (1 + np.exp(-flat[0]))), float(flat.sum())

    w = widgets.GenerationBrowser(hist, dream, n_frames=4)
    assert w.generation.value == 1 and f"{hist['mean'][0].sum():.1f}" in w.info.value  # from the first generation
    strip, plot = w.image.value, w.plot.value
    w.generation.value = 4
    np.testing.assert_array_equal(seen[-1], hist["mean"][3])  # generation 4 is the mean after its update
    assert w.image.value != strip and w.plot.value != plot
