"""The imitation bound's fit: targets invert C's squash, the ridge fit recovers a known linear C."""

import jax.numpy as jnp
import numpy as np

from wmlib.controller import squash
from wmlib.imitation import NO_BRAKE, action_targets, fit_linear


def test_targets_invert_the_squash():
    a = np.array([[0.3, 0.8, 0.0], [-0.9, 0.1, 0.5], [1.0, 1.0, 1.0]], np.float32)
    t = action_targets(a)
    back = np.asarray(squash(jnp.asarray(t, jnp.float32)))
    np.testing.assert_allclose(back[:2, :2], a[:2, :2], atol=1e-6)  # unsaturated steer and gas come back
    assert t[0, 2] == NO_BRAKE and back[0, 2] == 0.0  # no brake -> an output that gives brake 0
    np.testing.assert_allclose(back[1, 2], 0.5, atol=1e-6)
    np.testing.assert_allclose(back[2], [0.95, (0.95 + 1) / 2, 0.95], atol=1e-6)  # saturated: clipped


def test_fit_recovers_a_linear_map_and_matches_lstsq():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 6))
    W, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    Y = X @ W.T + b
    W_fit, b_fit = fit_linear(X, Y, ridge=0.0)
    np.testing.assert_allclose(W_fit, W, atol=1e-8)
    np.testing.assert_allclose(b_fit, b, atol=1e-8)
    noisy = Y + rng.normal(size=Y.shape)
    ref = np.linalg.lstsq(np.concatenate([X, np.ones((500, 1))], 1), noisy, rcond=None)[0]
    W_fit, b_fit = fit_linear(X, noisy, ridge=0.0)
    np.testing.assert_allclose(np.concatenate([W_fit.T, b_fit[None]]), ref, atol=1e-8)
    W_ridge, _ = fit_linear(X, noisy, ridge=1e4)  # a strong penalty shrinks the weights, not the bias
    assert np.abs(W_ridge).sum() < 0.5 * np.abs(W_fit).sum()
