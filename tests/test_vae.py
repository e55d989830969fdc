"""V: the fast im2col layers against the plain lax ones, the paper's architecture, the loss, checkpoints, helpers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wmlib.vae as V
from wmlib import checkpoint
from wmlib.data import Episode, episode_name, save_episode
from wmlib.fast import conv as fast_conv


def assert_same_op(ours, ref, x, w):
    """Values and the gradients wrt input and kernel of a non-linear function of the output agree."""
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-4, atol=1e-4)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    for g_ours, g_ref in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=2e-4 * float(jnp.abs(g_ref).max()))


def normal(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


# every layer shape of the paper's V (and one odd case), batch 3, fewer channels to keep it quick
@pytest.mark.parametrize("h, k", [(64, 4), (31, 4), (14, 4), (6, 4), (13, 5)])
def test_conv2d_matches_lax(h, k):
    assert_same_op(fast_conv.conv2d, V.conv2d, normal(0, 3, h, h, 5), normal(1, k, k, 5, 7))


@pytest.mark.parametrize("h, k", [(1, 5), (5, 5), (13, 6), (30, 6), (4, 4)])
def test_conv_transpose2d_matches_lax(h, k):
    assert_same_op(fast_conv.conv_transpose2d, V.conv_transpose2d, normal(0, 3, h, h, 5), normal(1, 5, k, k, 7))


def test_conv_transpose2d_spreads_each_pixel_over_its_kernel():
    """The kernel layout (Cin, k, k, Cout), as PyTorch's: y[2i + a, 2j + b] += x[i, j] @ w[:, a, b]."""
    x, w = normal(0, 1, 2, 1, 5), normal(1, 5, 4, 4, 7)
    want = np.zeros((1, 6, 4, 7), np.float32)
    for i in range(2):
        want[0, 2 * i:2 * i + 4] += np.einsum("c,cabo->abo", x[0, i, 0], w)
    for conv in (V.conv_transpose2d, fast_conv.conv_transpose2d):
        np.testing.assert_allclose(conv(x, w), want, rtol=1e-5, atol=1e-5)


def test_layers_chunk_the_batch_without_changing_results(monkeypatch):
    # a budget of 2 examples' im2col rows: conv2d runs chunks of 2, 2, 2 and a remainder of 1,
    # the transposed convolution (3x bigger rows) chunks of 1
    x, w, wt = normal(0, 7, 14, 14, 4), normal(1, 4, 4, 4, 6), normal(2, 4, 6, 6, 3)
    monkeypatch.setattr(fast_conv, "CHUNK_BYTES", fast_conv._patch_bytes(x, 4) * 2)
    assert_same_op(fast_conv.conv2d, V.conv2d, x, w)
    assert_same_op(fast_conv.conv_transpose2d, V.conv_transpose2d, x, wt)


def test_fast_and_plain_vae_agree():
    """ConvVAE(fast=True) and ConvVAE(fast=False): same parameters, same loss, same gradients."""
    key = jax.random.PRNGKey(0)
    fast, plain = V.ConvVAE(key, fast=True), V.ConvVAE(key, fast=False)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(a, b)
    frames = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    grad = eqx.filter_jit(eqx.filter_value_and_grad(V.vae_loss, has_aux=True))
    (loss_fast, _), g_fast = grad(fast, frames, jax.random.PRNGKey(1))
    (loss_plain, _), g_plain = grad(plain, frames, jax.random.PRNGKey(1))
    np.testing.assert_allclose(loss_fast, loss_plain, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.abs(b).max()))


@eqx.filter_jit
def run_model(vae, x):
    """Everything test_paper_architecture looks at, in one compiled call (eager dispatch is slow)."""
    mu, logvar = vae.encode(x)
    muv, logvarv = jax.vmap(vae.encode)(x)
    mu1, _ = vae.encode(x[1])
    return mu, logvar, vae.decode(mu), mu1, muv, logvarv


def test_paper_architecture():
    vae = V.ConvVAE(jax.random.PRNGKey(0))
    assert sum(a.size for a in jax.tree.leaves(eqx.filter(vae, eqx.is_array))) == 4_348_547
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 64, 64, 3)).astype(np.float32))
    mu, logvar, frames, mu1, muv, logvarv = run_model(vae, x)
    assert mu.shape == logvar.shape == (3, 32) and frames.shape == (3, 64, 64, 3)
    # one frame, a batch and a vmapped batch agree
    assert mu1.shape == (32,)
    np.testing.assert_allclose(mu1, mu[1], atol=1e-5)
    np.testing.assert_allclose(muv, mu, atol=1e-5)
    np.testing.assert_allclose(logvarv, logvar, atol=1e-5)
    assert float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0


def with_posterior(vae, mu, logvar):
    """vae whose encoder outputs the constant posterior (mu, logvar) for every frame."""
    vae = eqx.tree_at(lambda v: (v.mu.weight, v.mu.bias), vae, (vae.mu.weight * 0, jnp.full(32, mu)))
    return eqx.tree_at(lambda v: (v.logvar.weight, v.logvar.bias), vae, (vae.logvar.weight * 0, jnp.full(32, logvar)))


@pytest.mark.parametrize("mu, logvar, kl", [(0.0, 0.0, 0.0),                    # below 16: clipped to 16
                                            (2.0, 0.0, 64.0),                   # 0.5 * 32 * 4: unclipped
                                            (0.5, -1.0, 16 * (0.25 + np.exp(-1)))])  # just above: unclipped
def test_loss_by_hand(mu, logvar, kl):
    vae = with_posterior(V.ConvVAE(jax.random.PRNGKey(0)), mu, logvar)
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    key = jax.random.PRNGKey(3)
    loss, aux = eqx.filter_jit(V.vae_loss)(vae, jnp.asarray(frames), key)
    x = frames.astype(np.float64) / 255.0
    recon, mu_out, logvar_out = (np.asarray(a, np.float64)
                                 for a in eqx.filter_jit(lambda v, x: v(x, key))(vae, jnp.asarray(x, jnp.float32)))
    kl_np = -0.5 * np.sum(1 + logvar_out - mu_out ** 2 - np.exp(logvar_out), axis=1)
    np.testing.assert_allclose(kl_np, kl, rtol=1e-5, atol=1e-5)
    recon_np = np.sum((recon - x) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(float(loss), np.mean(recon_np + np.maximum(kl_np, 0.5 * 32)), rtol=1e-5)
    np.testing.assert_allclose(float(aux["recon"]), recon_np.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["kl"]), kl, rtol=1e-5, atol=1e-5)


def test_frames_must_be_uint8_64x64x3():
    vae = V.ConvVAE(jax.random.PRNGKey(0))
    bad_batches = (np.zeros((2, 96, 96, 3), np.uint8), np.zeros((2, 64, 64, 3), np.float32),
                   np.zeros((64, 64, 3), np.uint8))
    for bad in bad_batches:
        with pytest.raises(ValueError, match=r"\(B, 64, 64, 3\) and dtype uint8"):
            V.vae_loss(vae, jnp.asarray(bad), jax.random.PRNGKey(0))
        with pytest.raises(ValueError, match="uint8"):
            V.encode_frames(vae, bad)


def test_train_step_learns_and_helpers():
    vae = V.ConvVAE(jax.random.PRNGKey(0))
    frames = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    optimizer = V.make_optimizer(1e-3)
    opt_state = optimizer.init(eqx.filter(vae, eqx.is_inexact_array))
    step = V.make_train_step(optimizer)
    losses = []
    for i in range(4):
        vae, opt_state, loss, aux = step(vae, opt_state, jnp.asarray(frames), jax.random.PRNGKey(i))
        losses.append(float(loss))
    assert set(aux) == {"recon", "kl"} and losses[-1] < losses[0]

    mu, logvar = V.encode_frames(vae, frames, batch=3)  # chunks 3, 3, 2 (padded)
    ref_mu, ref_logvar = eqx.filter_jit(V.ConvVAE.encode)(vae, jnp.asarray(frames, jnp.float32) / 255.0)
    assert isinstance(mu, np.ndarray) and mu.shape == logvar.shape == (8, 32)
    np.testing.assert_allclose(mu, ref_mu, atol=1e-5)
    np.testing.assert_allclose(logvar, ref_logvar, atol=1e-5)
    recon = V.reconstruct(vae, frames[:2])
    assert recon.shape == (2, 64, 64, 3) and recon.dtype == np.float32
    np.testing.assert_allclose(recon, V.decode_latents(vae, ref_mu[:2]), atol=1e-5)
    np.testing.assert_allclose(recon, eqx.filter_jit(V.ConvVAE.decode)(vae, ref_mu[:2]), atol=1e-5)
    metrics = V.validation_metrics(vae, frames, batch=4)
    assert set(metrics) == {"loss", "recon", "kl", "pixel_mse", "mean_frame_mse"}
    np.testing.assert_allclose(metrics["pixel_mse"], metrics["recon"] / (64 * 64 * 3))


def test_checkpoint_round_trip_and_wrong_kind(tmp_path):
    vae = V.ConvVAE(jax.random.PRNGKey(0), z_dim=16)
    V.save_vae(tmp_path / "vae.eqx", vae, extra={"step": 7})
    loaded, header = V.load_vae(tmp_path / "vae.eqx")
    assert loaded.z_dim == 16 and header["extra"] == {"step": 7}
    for a, b in zip(jax.tree.leaves(vae), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    checkpoint.save(tmp_path / "m.eqx", vae, "mdnrnn", {"z_dim": 16})
    with pytest.raises(checkpoint.CheckpointError, match="holds a mdnrnn checkpoint, expected a vae"):
        V.load_vae(tmp_path / "m.eqx")
    (tmp_path / "junk.eqx").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="not a wmlib checkpoint"):
        V.load_vae(tmp_path / "junk.eqx")


def test_train_vae_writes_a_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    for seed in range(3):
        ep = Episode(rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8), np.zeros((12, 3), np.float32),
                     np.zeros(12, np.float32), True, False, "random", seed)
        save_episode(tmp_path / "data" / episode_name("random", seed), ep)
    cfg = V.VAEConfig(batch_size=4, steps=2, val_episodes=1, val_frames=8, eval_every=2, mirror=True)
    V.train_vae(tmp_path / "data", tmp_path / "run", cfg, progress=False)
    vae, header = V.load_vae(tmp_path / "run" / "vae.eqx")
    assert header["extra"]["step"] == 2 and vae.z_dim == 32
