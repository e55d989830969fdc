"""The shared training loop and checkpoint files, on a tiny linear regression."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wmlib import checkpoint
from wmlib.files import read_jsonl
from wmlib.train import TrainingDiverged, fit

W_TRUE = np.array([[2.0, -1.0, 0.5]], np.float32)


def _batch(i):
    rng = np.random.default_rng(i)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    return x, x @ W_TRUE.T


def _loss(model, batch, key):
    x, y = batch
    err = jax.vmap(model)(x) - y
    return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}


def _model():
    return eqx.nn.Linear(3, 1, key=jax.random.PRNGKey(0))


def _fit(run_dir, steps, loss=_loss, lr=0.05):
    return fit(_model(), optax.adam(lr), loss, _batch, steps, run_dir, name="lin", kind="linear",
               hyper={}, evaluate=lambda m: {"loss": _loss(m, _batch(999), None)[0]}, eval_every=5,
               log_every=5, progress=False)


def test_fit_learns_and_logs(tmp_path):
    model = _fit(tmp_path, 200)
    np.testing.assert_allclose(model.weight, W_TRUE, atol=0.05)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert train[-1]["step"] == 200 and train[-1]["loss"] < train[0]["loss"] / 10
    assert val[-1]["val_loss"] < 1e-2
    header = checkpoint.read_header(tmp_path / "lin.eqx")
    assert header["kind"] == "linear" and header["extra"]["step"] == 200


def test_resume_equals_uninterrupted(tmp_path):
    straight = _fit(tmp_path / "a", 20)
    _fit(tmp_path / "b", 10)  # "interrupted" after 10 steps
    resumed = _fit(tmp_path / "b", 20)
    np.testing.assert_array_equal(straight.weight, resumed.weight)
    steps = [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert steps == [5, 10, 15, 20]  # no duplicated log lines after resuming


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    def exploding(model, batch, key):
        loss, aux = _loss(model, batch, key)
        return jnp.where(jnp.sum(jnp.abs(model.weight)) > 1.5, jnp.nan, loss), aux

    with pytest.raises(TrainingDiverged, match=r"lin\.eqx \(step \d+\) is kept"):
        _fit(tmp_path, 200, loss=exploding)
    model, header = checkpoint.load(tmp_path / "lin.eqx", "linear", lambda h: _model())
    assert np.isfinite(np.asarray(model.weight)).all() and header["extra"]["step"] > 0


def test_checkpoint_errors_name_the_file(tmp_path):
    path = checkpoint.save(tmp_path / "m.eqx", _model(), "linear", {"n": 3})
    with pytest.raises(checkpoint.CheckpointError, match=r"m\.eqx holds a linear checkpoint, expected a vae"):
        checkpoint.load(path, "vae", lambda h: _model())
    (tmp_path / "junk.eqx").write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match=r"junk\.eqx is not a wmlib checkpoint"):
        checkpoint.load(tmp_path / "junk.eqx", "linear", lambda h: _model())
    raw = path.read_bytes()
    (tmp_path / "cut.eqx").write_bytes(raw[:-20])
    with pytest.raises(checkpoint.CheckpointError, match=r"cut\.eqx: cannot read"):
        checkpoint.load(tmp_path / "cut.eqx", "linear", lambda h: _model())
    old = raw.replace(b'"format": 1', b'"format": 0')
    (tmp_path / "old.eqx").write_bytes(old)
    with pytest.raises(checkpoint.CheckpointError, match=r"old\.eqx has checkpoint format 0"):
        checkpoint.load(tmp_path / "old.eqx", "linear", lambda h: _model())

