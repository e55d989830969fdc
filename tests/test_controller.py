"""C: action squashing, the flat parameter order CMA-ES uses, size checks and checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmlib.checkpoint import CheckpointError, save
from wmlib.config import EvolveConfig
from wmlib.controller import (Controller, check_fits, free_params, from_flat, load_controller, n_params,
                              save_controller, squash, to_flat)
from wmlib.errors import WMError


def _squash_reference(a):
    """DESIGN.md's squashing, written out in numpy."""
    t = np.tanh(a)
    return np.stack([t[..., 0], (t[..., 1] + 1) / 2, np.clip(t[..., 2], 0, 1)], axis=-1)


def test_paper_size():
    assert n_params(32, 256) == 867 == n_params()
    assert to_flat(Controller()).shape == (867,)


def test_squash_ranges_and_values():
    assert np.allclose(squash(jnp.zeros(3)), [0.0, 0.5, 0.0])  # straight, half gas, no brake
    a = jax.random.normal(jax.random.PRNGKey(0), (1000, 3)) * 10
    s = np.asarray(squash(a))
    assert s[:, 0].min() >= -1 and s[:, 0].max() <= 1 and s[:, 0].min() < -0.99 and s[:, 0].max() > 0.99
    assert s[:, 1:].min() >= 0 and s[:, 1:].max() <= 1 and s[:, 1].min() < 0.01 and s[:, 1].max() > 0.99
    assert np.all(s[np.asarray(a[:, 2]) < 0, 2] == 0)  # negative brake output: no brake
    np.testing.assert_allclose(s, _squash_reference(np.asarray(a)), atol=1e-6)


def test_flat_order_is_weight_row_major_then_bias():
    vec = jnp.arange(n_params(2, 3), dtype=jnp.float32)
    c = from_flat(vec, 2, 3)
    assert c.weight.shape == (3, 5) and c.bias.shape == (3,)
    assert c.weight[0, 1] == 1 and c.weight[1, 0] == 5 and list(c.bias) == [15, 16, 17]
    np.testing.assert_array_equal(to_flat(c), vec)


def test_call_matches_numpy_and_vmaps_from_flat():
    z_dim, hidden = 4, 6
    vecs = jax.random.normal(jax.random.PRNGKey(1), (5, n_params(z_dim, hidden)))
    z, h = jnp.linspace(-1, 1, z_dim), jnp.linspace(-0.5, 0.5, hidden)
    acts = jax.jit(jax.vmap(lambda v: from_flat(v, z_dim, hidden)(z, h)))(vecs)
    for v, act in zip(np.asarray(vecs), np.asarray(acts)):
        w, b = v[:-3].reshape(3, z_dim + hidden), v[-3:]
        np.testing.assert_allclose(act, _squash_reference(w @ np.concatenate([z, h]) + b), atol=1e-5)


def test_v_only_controller_frees_the_paper_s_99_parameters_and_ignores_h():
    """The paper's "V model only" C: 3 x 32 + 3 = 99 free parameters; with the rest at 0, h changes nothing."""
    free = free_params(32, 256, "z")
    assert free.sum() == 99 and free_params(32, 256, "zh").all()
    vec = np.where(free, np.random.default_rng(0).normal(size=867), 0.0).astype(np.float32)
    c = from_flat(jnp.asarray(vec))
    z = jnp.linspace(-1, 1, 32)
    np.testing.assert_array_equal(c(z, jnp.zeros(256)), c(z, jnp.ones(256) * 5.0))
    np.testing.assert_allclose(c(z, jnp.zeros(256)), squash(vec[:-3].reshape(3, 288)[:, :32] @ z + vec[-3:]),
                               rtol=1e-6)
    with pytest.raises(WMError, match="'h'"):
        free_params(32, 256, "h")
    with pytest.raises(WMError, match="evolve.inputs"):
        EvolveConfig(inputs="zz")


def test_wrong_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="867 parameters"):
        from_flat(jnp.zeros(866))
    with pytest.raises(ValueError, match="z_dim=16, hidden=256"):
        check_fits(Controller(32, 256), 16, 256)
    check_fits(Controller(32, 256), 32, 256)


def test_checkpoint_round_trip_and_size_check(tmp_path):
    c = Controller(4, 6, key=jax.random.PRNGKey(2))
    path = save_controller(tmp_path / "controller.eqx", c, extra={"generation": 3})
    loaded, header = load_controller(path, z_dim=4, hidden=6)
    np.testing.assert_array_equal(to_flat(loaded), to_flat(c))
    assert header["extra"]["generation"] == 3 and header["hyper"] == {"z_dim": 4, "hidden": 6}
    with pytest.raises(ValueError, match="controller.eqx"):
        load_controller(path, z_dim=32, hidden=256)
    save(tmp_path / "other.eqx", c, "mdnrnn", {})
    with pytest.raises(CheckpointError, match="expected a controller"):
        load_controller(tmp_path / "other.eqx")
