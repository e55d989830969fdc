"""Backends: Ray tasks give the same episodes as local processes; bad addresses fail fast and clearly."""

import time

import numpy as np
import pytest

from wmlib import rollouts
from wmlib.data import load_episode

pytestmark = pytest.mark.slow  # Ray starts a cluster for these: left out of the quick unit run


@pytest.fixture
def ray_backend():
    ray = pytest.importorskip("ray")
    rollouts.use_backend("ray", None)  # a local Ray instance with this machine's CPUs
    yield
    rollouts.use_backend("local")
    ray.shutdown()


def test_ray_collection_equals_local(tmp_path, ray_backend):
    rollouts.collect("recovery", 2, tmp_path / "ray", seed=3, max_steps=80, progress=False)
    rollouts.use_backend("local")
    rollouts.collect("recovery", 2, tmp_path / "local", seed=3, workers=2, max_steps=80, progress=False)
    for name in ("recovery_000003.npz", "recovery_000004.npz"):
        a, b = load_episode(tmp_path / "ray" / name), load_episode(tmp_path / "local" / name)
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.rewards, b.rewards)


def test_failures_are_reported_per_item_on_both_backends(tmp_path, ray_backend):
    items = [(rollouts.EpisodeSpec("brownian", 1, max_steps=20), str(tmp_path), False),
             (rollouts.EpisodeSpec("no-such-policy", 2, max_steps=20), str(tmp_path), False)]
    for backend in ("ray", "local"):
        rollouts.use_backend(backend)
        got = {item[0].seed: (result, error)
               for item, result, error in rollouts.parallel_map(rollouts._worker_call, items, 2, progress=False)}
        assert got[1][1] is None and got[1][0]["steps"] == 20, backend
        assert got[2][0] is None and "no-such-policy" in str(got[2][1]), backend


def test_unreachable_ray_address_fails_fast_with_the_address():
    pytest.importorskip("ray")
    t = time.perf_counter()
    with pytest.raises(ConnectionError, match="127.0.0.1:1"):
        rollouts.use_backend("ray", "127.0.0.1:1")
    assert time.perf_counter() - t < 10
    assert rollouts._backend["name"] == "local"


def test_unknown_backend_and_missing_ray(monkeypatch):
    with pytest.raises(ValueError, match="valid: local, ray"):
        rollouts.use_backend("dask")
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(RuntimeError, match="uv sync --extra ray"):
        rollouts.use_backend("ray")
