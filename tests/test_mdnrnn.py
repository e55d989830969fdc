"""M: the LSTM and the MDN against independent numpy/scipy code, sampling, losses, training, files."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp
from scipy.stats import norm

from wmlib.checkpoint import CheckpointError, save
from wmlib.config import RNNConfig
from wmlib.data import split_episodes
from wmlib.mdnrnn import (MDNRNN, MDNOutputs, load_mdnrnn, make_optimizer, make_train_step, mdn_log_prob,
                          mdnrnn_loss, sample_next_z, save_mdnrnn, train_mdnrnn, validation_metrics)

Z, A, H, K = 4, 3, 8, 5


@pytest.fixture(scope="module")
def model():
    m = MDNRNN(jax.random.PRNGKey(0), z_dim=Z, action_dim=A, hidden=H, n_mix=K)
    # non-zero biases, so the test also checks where they enter
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(9), x.shape), m)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_lstm(model, zs, acts):
    """Plain numpy LSTM (gate order i, f, g, o) with M's weights -> hidden states (T, H)."""
    W, b = np.asarray(model.weight, np.float64), np.asarray(model.bias, np.float64)
    h, c, hs = np.zeros(H), np.zeros(H), []
    for z, a in zip(zs, acts):
        g = np.concatenate([z, a, h]) @ W + b
        i, f, gg, o = g[:H], g[H:2 * H], g[2 * H:3 * H], g[3 * H:]
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(gg)
        h = sigmoid(o) * np.tanh(c)
        hs.append(h)
    return np.array(hs)


def numpy_heads(model, h):
    out = h @ np.asarray(model.head_weight, np.float64) + np.asarray(model.head_bias, np.float64)
    n = Z * K
    return out[:n].reshape(Z, K), out[n:2 * n].reshape(Z, K), out[2 * n:3 * n].reshape(Z, K), out[3 * n], out[3 * n + 1]


def test_lstm_and_heads_match_numpy(model):
    rng = np.random.default_rng(0)
    zs, acts = rng.normal(size=(6, Z)), rng.uniform(size=(6, A))
    hs = numpy_lstm(model, zs, acts)
    seq = model.forward_sequence(jnp.asarray(zs, jnp.float32), jnp.asarray(acts, jnp.float32))
    state = model.initial_state()
    for t in range(6):
        state, out = model.step(state, jnp.asarray(zs[t], jnp.float32), jnp.asarray(acts[t], jnp.float32))
        np.testing.assert_allclose(state[0], hs[t], atol=1e-5)
        logits, mu, log_sigma, reward, done = numpy_heads(model, hs[t])
        for got in (out, jax.tree.map(lambda x, t=t: x[t], seq)):  # step and forward_sequence agree
            np.testing.assert_allclose(got.logits, logits, atol=1e-5)
            np.testing.assert_allclose(got.mu, mu, atol=1e-5)
            np.testing.assert_allclose(got.log_sigma, log_sigma, atol=1e-5)
            np.testing.assert_allclose([got.reward, got.done_logit], [reward, done], atol=1e-5)


def random_outputs(key, shape=(Z, K)):
    k = jax.random.split(key, 3)
    return MDNOutputs(2 * jax.random.normal(k[0], shape), 2 * jax.random.normal(k[1], shape),
                      0.5 * jax.random.normal(k[2], shape), jnp.zeros(shape[:-2]), jnp.zeros(shape[:-2]))


def scipy_log_prob(out, z):
    logw = log_softmax(np.asarray(out.logits, np.float64), axis=-1)
    comp = norm.logpdf(np.asarray(z, np.float64)[..., None], np.asarray(out.mu), np.exp(np.asarray(out.log_sigma)))
    return logsumexp(logw + comp, axis=-1)


def test_mdn_log_prob_matches_scipy():
    out = random_outputs(jax.random.PRNGKey(1), (7, Z, K))
    z = 3 * jax.random.normal(jax.random.PRNGKey(2), (7, Z))
    np.testing.assert_allclose(mdn_log_prob(out, z), scipy_log_prob(out, z), rtol=1e-5, atol=1e-5)


def test_loss_parts_match_hand_computation(model):
    """NLL vs scipy, reward loss with asymmetry k = 3 by hand, done BCE by hand, padding ignored."""
    B, T = 2, 5
    rng = np.random.default_rng(3)
    z_seq = jnp.asarray(rng.normal(size=(B, T, Z)), jnp.float32)
    a_seq = jnp.asarray(rng.uniform(size=(B, T, A)), jnp.float32)
    z_next = jnp.asarray(rng.normal(size=(B, T, Z)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.float32)
    out = jax.vmap(model.forward_sequence)(z_seq, a_seq)
    err = np.array([[1.0, -2.0, 0.5, -1.0, 0.25], [2.0, -0.5, 1.0, 99.0, 99.0]])  # predicted - real
    reward = np.asarray(out.reward) - err
    done = jnp.array([[0, 0, 0, 0, 1], [0, 0, 1, 0, 0]], jnp.float32)
    loss, aux = mdnrnn_loss(model, z_seq, a_seq, z_next, jnp.asarray(reward), done, mask, reward_asymmetry=3.0)

    valid = np.asarray(mask) > 0
    nll = -scipy_log_prob(jax.tree.map(np.asarray, out), z_next).mean(-1)[valid].mean()
    hand = (3 * 1 + 4 + 3 * 0.25 + 1 + 3 * 0.0625 + 3 * 4 + 0.25 + 3 * 1) / 8
    p = sigmoid(np.asarray(out.done_logit, np.float64))
    bce = -(np.asarray(done) * np.log(p) + (1 - np.asarray(done)) * np.log(1 - p))[valid].mean()
    np.testing.assert_allclose([aux["nll"], aux["reward_loss"], aux["done_loss"]], [nll, hand, bce], rtol=1e-5)
    np.testing.assert_allclose(loss, nll + 10 * hand + 10 * bce, rtol=1e-5)
    _, sym = mdnrnn_loss(model, z_seq, a_seq, z_next, jnp.asarray(reward), done, mask)
    np.testing.assert_allclose(sym["reward_loss"], (err[valid] ** 2).mean(), rtol=1e-5)
    # positives weighted 4 times; reward targets below -0.5 raised to -0.5
    _, w = mdnrnn_loss(model, z_seq, a_seq, z_next, jnp.asarray(reward), done, mask, done_pos_weight=4.0,
                       reward_floor=-0.5)
    d = np.asarray(done)
    bce4 = -(4 * d * np.log(p) + (1 - d) * np.log(1 - p))[valid].mean()
    floored = np.asarray(out.reward) - np.maximum(reward, -0.5)
    np.testing.assert_allclose([w["done_loss"], w["reward_loss"]], [bce4, (floored[valid] ** 2).mean()], rtol=1e-5)


def mixture_samples(out, tau, n=200_000, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return np.asarray(jax.jit(jax.vmap(sample_next_z, (0, None, None)))(keys, out, tau))


def test_samples_match_mixture_moments_at_tau_1():
    out = random_outputs(jax.random.PRNGKey(4))
    w = np.exp(log_softmax(np.asarray(out.logits, np.float64), -1))
    mu, var = np.asarray(out.mu, np.float64), np.exp(2 * np.asarray(out.log_sigma, np.float64))
    mean = (w * mu).sum(-1)
    variance = (w * (var + mu ** 2)).sum(-1) - mean ** 2
    s = mixture_samples(out, 1.0)
    se = np.sqrt(variance / len(s))
    assert np.all(np.abs(s.mean(0) - mean) < 5 * se), (s.mean(0), mean)
    np.testing.assert_allclose(s.var(0), variance, rtol=0.03)


def test_temperature_flattens_the_mixture_and_widens_the_gaussians():
    """Two components at -10 and +10 with weights 0.8 / 0.2 and sigma 1: at temperature tau the
    weights become proportional to w^(1/tau) and each component's std becomes sqrt(tau)."""
    logits = jnp.log(jnp.array([[0.8, 0.2, 1e-30, 1e-30, 1e-30]]))
    out = MDNOutputs(logits, jnp.array([[-10.0, 10.0, 0.0, 0.0, 0.0]]), jnp.zeros((1, K)), jnp.zeros(()), jnp.zeros(()))
    for tau in (0.5, 1.0, 2.0):
        s = mixture_samples(out, tau, n=100_000)[:, 0]
        right = 0.2 ** (1 / tau) / (0.8 ** (1 / tau) + 0.2 ** (1 / tau))
        assert abs((s > 0).mean() - right) < 0.01, (tau, (s > 0).mean(), right)
        np.testing.assert_allclose(s[s < 0].std(), np.sqrt(tau), rtol=0.03)
    cold = mixture_samples(out, 0.01, n=10_000)[:, 0]
    assert np.all(cold < 0) and cold.std() < 0.15  # near-greedy: the likely component, narrow


def numpy_cell(model, h, c, z, a, mask=None):
    """One plain-numpy LSTM step with M's weights (and an optional dropout mask) -> (h, c)."""
    x = np.concatenate([z, a])
    if mask is not None:
        x, h = x * np.asarray(mask[0]), h * np.asarray(mask[1])
    g = np.concatenate([x, h]) @ np.asarray(model.weight, np.float64) + np.asarray(model.bias, np.float64)
    i, f, gg, o = g[:H], g[H:2 * H], g[2 * H:3 * H], g[3 * H:]
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(gg)
    return sigmoid(o) * np.tanh(c), c


def loss_inputs(rng, B=1, T=5):
    z_seq = jnp.asarray(rng.normal(size=(B, T, Z)), jnp.float32)
    a_seq = jnp.asarray(rng.uniform(-1, 1, size=(B, T, A)), jnp.float32)
    z_next = jnp.asarray(rng.normal(size=(B, T, Z)), jnp.float32)
    reward, done = jnp.asarray(rng.normal(size=(B, T)), jnp.float32), jnp.zeros((B, T))
    return z_seq, a_seq, z_next, reward, done


def test_overshoot_off_is_the_one_step_loss_bit_for_bit(model):
    """overshoot=0 (the default) is the old loss and the old gradient exactly, whatever w_overshoot;
    with overshoot on, the other terms stay as they were and the new one is added with its weight."""
    args = (*loss_inputs(np.random.default_rng(4), B=2), jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.float32))
    def loss_and_grad(**kw):
        return eqx.filter_jit(eqx.filter_value_and_grad(lambda m: mdnrnn_loss(m, *args, **kw), has_aux=True))(model)

    ((l0, a0), g0), ((l1, a1), g1) = loss_and_grad(), loss_and_grad(overshoot=0, w_overshoot=5.0)
    assert float(l0) == float(l1) and a0 == a1 and set(a0) == {"nll", "reward_loss", "done_loss"}
    assert all(bool(jnp.all(x0 == x1)) for x0, x1 in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    (l3, a3), _ = loss_and_grad(overshoot=3, w_overshoot=0.5)
    np.testing.assert_allclose([a3[k] for k in a0], [a0[k] for k in a0], rtol=1e-6)
    np.testing.assert_allclose(l3, l0 + 0.5 * a3["overshoot_nll"], rtol=1e-6)


@pytest.mark.parametrize("dropout", [False, True])
def test_overshoot_one_step_matches_hand_computation(model, dropout):
    """K = 1 on one sequence: from each teacher-forced state feed M's expected z (sum_k softmax(logits)_k
    mu_k) and the real next action, score the real z two frames ahead; numpy and scipy by hand."""
    from wmlib.mdnrnn import dropout_mask

    T = 5
    z_seq, a_seq, z_next, reward, done = loss_inputs(np.random.default_rng(7), T=T)
    mask = jnp.array([[1, 1, 1, 1, 0]], jnp.float32)  # the last step is padding
    drop = dropout_mask(jax.random.PRNGKey(3), 0.3, Z + A, H) if dropout else None
    masks = None if drop is None else jax.tree.map(lambda m: m[None], drop)
    _, aux = mdnrnn_loss(model, z_seq, a_seq, z_next, reward, done, mask, masks=masks, overshoot=1)

    zs, acts, targets = (np.asarray(x[0], np.float64) for x in (z_seq, a_seq, z_next))
    h, c, nlls = np.zeros(H), np.zeros(H), []
    for t in range(T - 2):  # pairs (t, t + 1) both inside the window: t = 0, 1, 2
        h, c = numpy_cell(model, h, c, zs[t], acts[t], drop)  # teacher-forced: (h_{t+1}, c_{t+1})
        logits, mu, *_ = numpy_heads(model, h)
        z_hat = (np.exp(logits - logsumexp(logits, axis=-1, keepdims=True)) * mu).sum(-1)  # E[z_{t+1}]
        h2, _ = numpy_cell(model, h, c, z_hat, acts[t + 1], drop)
        logits2, mu2, log_sigma2, *_ = numpy_heads(model, h2)
        out2 = MDNOutputs(logits2, mu2, log_sigma2, 0.0, 0.0)
        nlls.append(-scipy_log_prob(out2, targets[t + 1]).mean())  # z_{t+2}
    np.testing.assert_allclose(aux["overshoot_nll"], np.mean(nlls), rtol=1e-5)


def test_overshoot_masks_what_lies_past_the_window(model):
    """Term (t, k) counts only when z_t .. z_{t+k+1} are all in the window, so a padded window gives
    the loss of the same window cut short (what stands in the padding changes nothing)."""
    from wmlib.mdnrnn import open_loop_log_prob

    T, steps = 6, 3
    z_seq, a_seq, z_next, reward, done = loss_inputs(np.random.default_rng(8), B=2, T=T)
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], jnp.float32)
    states = model.state_sequence(z_seq[1], a_seq[1])
    out = jax.vmap(model.heads)(states[0])
    _, valid = eqx.filter_jit(open_loop_log_prob)(model, states, out, a_seq[1], z_next[1], mask[1], steps)
    t, k = np.meshgrid(np.arange(T), np.arange(1, steps + 1), indexing="ij")
    np.testing.assert_array_equal(valid, (t + k <= 3).astype(np.float32))  # the last real target: z_next[3]

    loss = jax.jit(lambda *xs: mdnrnn_loss(model, *xs, overshoot=steps)[1]["overshoot_nll"])
    padded = (z_seq[1:], a_seq[1:], z_next[1:], reward[1:], done[1:], mask[1:])
    np.testing.assert_allclose(loss(*padded), loss(*(x[:, :4] for x in padded)), rtol=1e-6)


def test_overshoot_gradients_are_finite_and_reach_the_lstm(model):
    from wmlib.mdnrnn import dropout_mask

    args = (*loss_inputs(np.random.default_rng(10), B=2), jnp.ones((2, 5)))
    masks = jax.vmap(lambda k: dropout_mask(k, 0.2, Z + A, H))(jax.random.split(jax.random.PRNGKey(0), 2))
    only_overshoot = dict(w_mdn=0.0, w_reward=0.0, w_done=0.0, overshoot=4, masks=masks)
    g = eqx.filter_jit(eqx.filter_grad(lambda m: mdnrnn_loss(m, *args, **only_overshoot)[0]))(model)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    assert float(jnp.abs(g.weight).max()) > 0 and float(jnp.abs(g.head_weight).max()) > 0


def batch_from(model, rng, B=3, T=6, true_mu=False):
    """A SequenceSampler-style batch whose targets M can learn: z_{t+1} = 0.5 z_t, reward = a_0."""
    mu = np.zeros((B, T + 1, Z), np.float32)
    mu[:, 0] = rng.normal(size=(B, Z))
    for t in range(T):
        mu[:, t + 1] = 0.5 * mu[:, t]
    action = rng.uniform(size=(B, T, A)).astype(np.float32)
    mask = np.ones((B, T + 1), np.float32)
    mask[-1, -2:] = 0
    done = np.zeros((B, T), np.float32)
    done[:, -1] = 1
    return {"mu": mu, "logvar": np.full_like(mu, -6.0), "action": action, "reward": action[..., 0].copy(),
            "done": done, "mask": mask}


def test_train_step_lowers_the_loss(model):
    batch = jax.tree.map(jnp.asarray, batch_from(model, np.random.default_rng(5)))
    opt = make_optimizer(RNNConfig(learning_rate=1e-2))
    step = make_train_step(opt)
    state = opt.init(jax.tree.map(lambda x: x, model))
    m, first = model, None
    for i in range(30):
        m, state, loss, aux = step(m, state, batch, jax.random.PRNGKey(i))
        first = float(loss) if first is None else first
        assert set(aux) == {"nll", "reward_loss", "done_loss"}
    assert float(loss) < 0.5 * first


def test_validation_metrics_match_numpy(model):
    rng = np.random.default_rng(6)
    batches = [batch_from(model, rng), batch_from(model, rng, B=2)]
    got = validation_metrics(model, batches)
    preds, rewards, dones, nlls = [], [], [], []
    for b in batches:
        out = jax.vmap(model.forward_sequence)(b["mu"][:, :-1], b["action"])
        m, mz = b["mask"][:, :-1] > 0, (b["mask"][:, :-1] * b["mask"][:, 1:]) > 0
        preds.append(np.asarray(out.reward)[m]), rewards.append(b["reward"][m])
        dones.append((np.asarray(out.done_logit)[m] > 0, b["done"][m] > 0.5))
        nlls.append(-scipy_log_prob(jax.tree.map(np.asarray, out), b["mu"][:, 1:]).sum(-1)[mz])
    p, r = np.concatenate(preds), np.concatenate(rewards)
    dp, dr = np.concatenate([d[0] for d in dones]), np.concatenate([d[1] for d in dones])
    np.testing.assert_allclose(got["reward_mae"], np.abs(p - r).mean(), rtol=1e-4)
    np.testing.assert_allclose(got["reward_corr"], np.corrcoef(p, r)[0, 1], rtol=1e-3)
    np.testing.assert_allclose(got["nll_per_step"], np.concatenate(nlls).mean(), rtol=1e-4)
    tp = (dp & dr).sum()
    expected_precision = tp / dp.sum() if dp.sum() else np.nan
    np.testing.assert_allclose(got["done_precision"], expected_precision, rtol=1e-6)
    np.testing.assert_allclose(got["done_recall"], tp / dr.sum(), rtol=1e-6)


def test_split_keeps_mirror_images_together():
    names = [f"brownian_{i:06d}.npz" for i in range(5)] + [f"brownian_{i:06d}_mirror.npz" for i in range(5)]
    train, val = split_episodes(names, 2, seed=1)
    assert len(val) == 4 and sorted(train + val) == sorted(names)
    assert {n.replace("_mirror", "") for n in val}.isdisjoint({n.replace("_mirror", "") for n in train})


def random_encoded(rng, episodes: int = 3, steps: int = 12, z_dim: int = Z) -> dict:
    """Encoded episodes of random latents and actions, each ending in a done."""
    return {f"ep_{i}.npz": {"mu": rng.normal(size=(steps, z_dim)).astype(np.float32),
                            "logvar": np.full((steps, z_dim), -3.0, np.float32),
                            "actions": rng.uniform(size=(steps, A)).astype(np.float32),
                            "rewards": rng.normal(size=steps).astype(np.float32),
                            "dones": np.eye(steps, dtype=np.float32)[-1]} for i in range(episodes)}


def test_train_mdnrnn_writes_a_loadable_checkpoint(tmp_path):
    encoded = random_encoded(np.random.default_rng(7))
    cfg = RNNConfig(hidden=H, seq_len=5, batch_size=2, epochs=2, val_episodes=1)
    model = train_mdnrnn(encoded, tmp_path, cfg, vae_id="abc", progress=False)
    loaded, header = load_mdnrnn(tmp_path / "mdnrnn.eqx")
    assert header["extra"]["vae_id"] == "abc" and loaded.hidden == H and loaded.z_dim == Z
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(loaded)))


def test_checkpoint_round_trip(model, tmp_path):
    path = save_mdnrnn(tmp_path / "m.eqx", model, extra={"epoch": 2})
    loaded, header = load_mdnrnn(path)
    assert header["hyper"] == {"z_dim": Z, "action_dim": A, "hidden": H, "n_mix": K}
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(loaded)))
    save(tmp_path / "c.eqx", model, "controller", {})
    with pytest.raises(CheckpointError, match="expected a mdnrnn"):
        load_mdnrnn(tmp_path / "c.eqx")


def test_dropout_masks_and_their_use(model):
    """A mask of ones changes nothing; forward_sequence with a mask equals stepping with it; masks
    are inverted dropout (entries 0 or 1/(1-p), mean about 1)."""
    from wmlib.mdnrnn import dropout_mask

    ones = dropout_mask(jax.random.PRNGKey(0), 0.0, Z + A, H)
    assert all(bool(jnp.all(m == 1.0)) for m in ones)
    m_in, m_h = dropout_mask(jax.random.PRNGKey(1), 0.5, 4000, 4000)
    assert set(np.unique(np.asarray(m_in)).tolist()) == {0.0, 2.0}
    assert abs(float(m_h.mean()) - 1.0) < 0.1
    rng = np.random.default_rng(5)
    zs, acts = jnp.asarray(rng.normal(size=(6, Z)), jnp.float32), jnp.asarray(rng.uniform(size=(6, A)), jnp.float32)
    np.testing.assert_allclose(model.forward_sequence(zs, acts, None, ones).mu, model.forward_sequence(zs, acts).mu,
                               rtol=1e-6)
    mask = dropout_mask(jax.random.PRNGKey(2), 0.3, Z + A, H)
    out = model.forward_sequence(zs, acts, None, mask)
    state, mus = model.initial_state(), []
    for z, a in zip(zs, acts):
        state, o = model.step(state, z, a, mask)
        mus.append(o.mu)
    np.testing.assert_allclose(out.mu, np.stack(mus), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out.mu, model.forward_sequence(zs, acts).mu)  # the mask did something


def test_sample_toy_mdn_temperature_narrows_and_widens_the_samples():
    from wmlib.mdnrnn import ToyMDN, sample_toy_mdn

    model = ToyMDN(jax.random.PRNGKey(0), n_mix=3)
    xs = np.zeros(4000, np.float32)  # one input: every spread below is the mixture's own
    out = model(jnp.zeros(()))
    pi = np.asarray(jax.nn.softmax(out.logits[0]))
    mu = np.asarray(out.mu[0])
    key = jax.random.PRNGKey(1)
    cold, warm = sample_toy_mdn(model, xs, key, tau=0.01), sample_toy_mdn(model, xs, key, tau=1.0)
    # tau -> 0: the most likely component's mean, almost no noise; tau = 1: the mixture's own moments
    np.testing.assert_allclose(np.median(cold), mu[np.argmax(pi)], atol=0.1 * np.exp(out.log_sigma[0]).max())
    var = np.sum(pi * (np.exp(2 * np.asarray(out.log_sigma[0])) + mu ** 2)) - np.sum(pi * mu) ** 2
    np.testing.assert_allclose(warm.std(), np.sqrt(var), rtol=0.06)
    assert cold.std() < 0.5 * warm.std()
