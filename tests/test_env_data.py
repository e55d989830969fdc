"""Preprocessing, episode files, manifests, mirroring and frame batches."""

import numpy as np
import pytest

from wmlib import data
from wmlib.env import make_env, preprocess
from wmlib.files import atomic_write


@pytest.fixture(scope="module")
def real_obs():
    env = make_env()
    obs, _ = env.reset(seed=3)
    for _ in range(60):  # past the zoom-in, with some speed so the bar shows
        obs, *_ = env.step(np.array([0.0, 1.0, 0.0], np.float32))
    env.close()
    return obs


def test_preprocess_shape_dtype_and_crop(real_obs):
    frame = preprocess(real_obs)
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    # The indicator bar (rows 84..95) is black with coloured gauges; the crop must remove it:
    # painting the bar white leaves the frame unchanged, painting the road changes it.
    bar_white = real_obs.copy()
    bar_white[84:] = 255
    np.testing.assert_array_equal(preprocess(bar_white), frame)
    road_white = real_obs.copy()
    road_white[:84] = 255
    assert (preprocess(road_white) == 255).all()


def test_preprocess_is_area_average():
    # A 96x96 observation whose rows 0..83 alternate black/white columns averages to mid-grey.
    obs = np.zeros((96, 96, 3), np.uint8)
    obs[:84, ::2] = 200
    frame = preprocess(obs)
    assert abs(float(frame.mean()) - 100) < 2


def test_preprocess_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(96, 96, 3\) uint8"):
        preprocess(np.zeros((64, 64, 3), np.uint8))


def _episode(T=7, seed=1, terminated=True):
    rng = np.random.default_rng(seed)
    return data.Episode(frames=rng.integers(0, 256, (T, 64, 64, 3), dtype=np.uint8),
                        actions=rng.uniform(-1, 1, (T, 3)).astype(np.float32),
                        rewards=rng.normal(size=T).astype(np.float32), terminated=terminated,
                        truncated=not terminated, policy="brownian", seed=seed,
                        info={"car_xy": rng.normal(size=(T, 2)).astype(np.float32)})


def test_episode_round_trip_and_dones(tmp_path):
    ep = _episode()
    path = data.save_episode(tmp_path / "a.npz", ep)
    back = data.load_episode(path)
    np.testing.assert_array_equal(back.frames, ep.frames)
    np.testing.assert_array_equal(back.actions, ep.actions)
    np.testing.assert_array_equal(back.info["car_xy"], ep.info["car_xy"])
    assert (back.policy, back.seed, back.terminated, back.mirrored) == ("brownian", 1, True, False)
    assert back.dones.tolist() == [0, 0, 0, 0, 0, 0, 1]
    assert _episode(terminated=False).dones.sum() == 0


def test_truncated_and_foreign_files_are_reported_by_path(tmp_path):
    path = data.save_episode(tmp_path / "a.npz", _episode())
    raw = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.EpisodeError, match="cut.npz"):
        data.load_episode(tmp_path / "cut.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(data.EpisodeError, match="other.npz.*not a wmlib episode"):
        data.load_episode(tmp_path / "other.npz")
    with pytest.raises(data.EpisodeError, match="missing.npz"):
        data.load_episode(tmp_path / "missing.npz")


def test_interrupted_write_leaves_no_file(tmp_path):
    target = tmp_path / "ep.npz"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as f:
            f.write(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_mirror_flips_frames_and_negates_steering():
    ep = _episode()
    m = data.mirror_episode(ep)
    np.testing.assert_array_equal(m.frames[:, :, 0], ep.frames[:, :, -1])
    np.testing.assert_array_equal(m.actions[:, 0], -ep.actions[:, 0])
    np.testing.assert_array_equal(m.actions[:, 1:], ep.actions[:, 1:])
    assert m.mirrored and not ep.mirrored
    np.testing.assert_array_equal(data.mirror_episode(m).frames, ep.frames)


def test_manifest_lists_episodes(tmp_path):
    for s in (1, 2):
        data.save_episode(tmp_path / data.episode_name("brownian", s), _episode(seed=s))
    manifest = data.write_manifest(tmp_path)
    assert sorted(manifest["episodes"]) == ["brownian_000001.npz", "brownian_000002.npz"]
    assert manifest["frames"] == 14
    assert data.read_manifest(tmp_path)["brownian_000002.npz"]["seed"] == 2


def test_frame_sampler_is_deterministic_bounded_and_mirrors(tmp_path):
    files = [data.save_episode(tmp_path / f"{s}.npz", _episode(T=5, seed=s)) for s in range(6)]
    sampler = data.FrameSampler(files, batch_size=8, seed=0, buffer_episodes=2, block_batches=3)
    a = sampler.batch(4)
    assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8
    assert len(sampler._buffer) == 2  # memory bound: never more than buffer_episodes decoded
    fresh = data.FrameSampler(files, batch_size=8, seed=0, buffer_episodes=2, block_batches=3)
    np.testing.assert_array_equal(fresh.batch(4), a)  # same index -> same batch (resume)
    all_frames = np.concatenate([data.load_episode(f).frames for f in files])
    flat = all_frames.reshape(len(all_frames), -1)
    for frame in a:  # every sampled frame is a real frame of the collection
        assert (flat == frame.reshape(-1)).all(axis=1).any()
    mirrored = data.FrameSampler(files, batch_size=64, seed=0, mirror=True).batch(0)
    flipped = sum(not (flat == f.reshape(-1)).all(axis=1).any() for f in mirrored)
    assert 10 < flipped < 54  # about half flipped
    with pytest.raises(data.EpisodeError, match="empty"):
        data.FrameSampler([], batch_size=2)


def _fake_encode(frames):
    """A stand-in V for data-plumbing tests: z = mean colour per channel, repeated."""
    m = frames.reshape(len(frames), -1, 3).mean(axis=1) / 255.0
    return np.tile(m, (1, 2)), np.zeros((len(frames), 6))


def test_encode_collection_resumes_mirrors_and_checks_vae(tmp_path):
    for s in (1, 2):
        data.save_episode(tmp_path / data.episode_name("brownian", s), _episode(T=9, seed=s))
    out = data.encode_collection(tmp_path, _fake_encode, "v1", mirror=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["brownian_000001.npz", "brownian_000001_mirror.npz",
                                                     "brownian_000002.npz", "brownian_000002_mirror.npz"]
    enc = data.load_encoded(tmp_path, "v1")
    ep = data.load_episode(tmp_path / "brownian_000001.npz")
    np.testing.assert_allclose(enc["brownian_000001.npz"]["mu"], _fake_encode(ep.frames)[0], rtol=1e-6)
    np.testing.assert_array_equal(enc["brownian_000001_mirror.npz"]["actions"][:, 0], -ep.actions[:, 0])
    assert enc["brownian_000001.npz"]["dones"][-1] == 1
    before = (out / "brownian_000001.npz").stat().st_mtime_ns
    data.encode_collection(tmp_path, _fake_encode, "v1", mirror=True, progress=False)
    assert (out / "brownian_000001.npz").stat().st_mtime_ns == before  # resumed: nothing redone
    with pytest.raises(data.EpisodeError, match="no encodings by V v2.*encodings by V v1"):
        data.load_encoded(tmp_path, "v2")


def test_sequence_sampler_windows_and_padding():
    T = 10
    eps = [{"mu": np.arange(T)[:, None] * np.ones((1, 4), np.float32) + 100 * i,
            "logvar": np.zeros((T, 4), np.float32), "actions": np.ones((T, 3), np.float32) * i,
            "rewards": np.arange(T, dtype=np.float32), "dones": np.eye(T, dtype=np.float32)[-1]}
           for i in range(3)]
    s = data.SequenceSampler(eps, seq_len=4, batch_size=2, seed=0)
    b = s.batch(0)
    assert b["mu"].shape == (2, 5, 4) and b["action"].shape == (2, 4, 3) and b["mask"].shape == (2, 5)
    for k in range(2):  # targets are the next latents of the same episode
        valid = b["mask"][k] > 0
        mu = b["mu"][k, valid, 0]
        assert np.all(np.diff(mu) == 1)
    np.testing.assert_array_equal(s.batch(3)["mu"], data.SequenceSampler(eps, 4, 2, seed=0).batch(3)["mu"])
    # validation windows cover every step exactly once, and the episode end is marked done
    windows = s.all_windows()
    assert sum(w["mask"][:, :-1].sum() for w in windows) == 3 * T
    assert sum(w["done"].sum() for w in windows) == 3
