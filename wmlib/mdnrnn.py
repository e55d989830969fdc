"""M, the MDN-RNN (paper section 2.2 and appendix A.3): an LSTM that predicts the next latent.

Each step reads [z_t, a_t] (z_dim + action_dim = 35 inputs), updates the LSTM state (h, c) (256
units) and from the new h_{t+1} predicts
  - P(z_{t+1} | z_t, a_t, h_t): for EACH of the z_dim latent dimensions independently, a mixture of
    n_mix (5) one-dimensional Gaussians, as in the paper's code (the mixture is per dimension, not one
    shared mixture of diagonal Gaussians): logits, mu and log sigma, each of shape (z_dim, n_mix);
  - the reward r_t received for a_t (a scalar, regression);
  - whether the episode ends after a_t (a logit).

The LSTM is written out (gate order i, f, g, o as in PyTorch; forget-gate bias initialised to 1):
    [i, f, g, o] = [z_t, a_t, h_t] W + b          W: (z_dim + action_dim + hidden, 4 hidden)
    c_{t+1} = sigmoid(f) c_t + sigmoid(i) tanh(g),    h_{t+1} = sigmoid(o) tanh(c_{t+1})
One linear head (h_{t+1} W_head + b_head) maps h_{t+1} to 3 * z_dim * n_mix + 2 numbers laid out as
    [logits (z_dim*n_mix) | mu (z_dim*n_mix) | log sigma (z_dim*n_mix) | reward | done logit],
each block row-major over (z_dim, n_mix). Weights are stored (inputs, outputs) so that under vmap
every matmul is (batch, in) @ (in, out) and XLA needs no transposes in the dream's inner loop.

Targets of step t: z_{t+1} (the next frame's latent), r_t and done_t (the reward and end flag that
followed a_t). Sampling with temperature tau divides the logits by tau and scales sigma by sqrt(tau).

Dropout (Dropout's Dream Land, Wellmer & Kwok 2021): an optional `mask` multiplies the LSTM's inputs
[z_t, a_t] and its recurrent h_t by 0 or 1/(1-p), one mask held fixed along a whole sequence. In
training it regularises M; in the dream a new mask per dream episode makes each dream a slightly
different world, so a controller cannot exploit the quirks of one M.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from wmlib import checkpoint
from wmlib.config import RNNConfig
from wmlib.data import SequenceSampler, split_episodes
from wmlib.train import fit, make_step
from wmlib.errors import WMError

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

LSTMState = tuple[Float[Array, " hidden"], Float[Array, " hidden"]]
DropoutMask = tuple[Float[Array, " in"], Float[Array, " hidden"]]  # on [z, a] and on h


def dropout_mask(key: jax.Array, rate: float | Float[Array, ""], n_in: int, hidden: int) -> DropoutMask:
    """Inverted-dropout masks for M's inputs (n_in) and recurrent state (hidden): each entry 0 with
    probability `rate`, else 1 / (1 - rate); all ones when rate is 0."""
    k_in, k_h = jax.random.split(key)
    keep = 1.0 - rate
    m_in, m_h = (jax.random.bernoulli(k, keep, (n,)) / keep for k, n in ((k_in, n_in), (k_h, hidden)))
    return m_in, m_h


class MDNOutputs(NamedTuple):
    """What M predicts after one step; a sequence adds a leading time axis (T, ...)."""
    logits: Float[Array, "... z_dim n_mix"]
    mu: Float[Array, "... z_dim n_mix"]
    log_sigma: Float[Array, "... z_dim n_mix"]
    reward: Float[Array, "..."]
    done_logit: Float[Array, "..."]


class MDNRNN(eqx.Module):
    """LSTM + per-dimension MDN head + reward and done heads, for ONE sequence (batch with vmap)."""

    weight: Float[Array, "in_plus_h 4h"]
    bias: Float[Array, " 4h"]
    head_weight: Float[Array, "hidden out"]
    head_bias: Float[Array, " out"]
    z_dim: int = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)
    hidden: int = eqx.field(static=True)
    n_mix: int = eqx.field(static=True)

    def __init__(self, key: jax.Array, z_dim: int = 32, action_dim: int = 3, hidden: int = 256, n_mix: int = 5):
        wkey, hkey = jax.random.split(key)
        self.z_dim, self.action_dim, self.hidden, self.n_mix = z_dim, action_dim, hidden, n_mix
        bound = 1.0 / math.sqrt(hidden)  # PyTorch's initialisation, for the LSTM and the head
        self.weight = jax.random.uniform(wkey, (z_dim + action_dim + hidden, 4 * hidden),
                                         minval=-bound, maxval=bound)
        self.bias = jnp.zeros(4 * hidden).at[hidden:2 * hidden].set(1.0)  # forget gate open at start
        self.head_weight = jax.random.uniform(hkey, (hidden, 3 * z_dim * n_mix + 2), minval=-bound, maxval=bound)
        self.head_bias = jnp.zeros(3 * z_dim * n_mix + 2)

    def initial_state(self) -> LSTMState:
        """The zero LSTM state (h, c)."""
        return jnp.zeros(self.hidden), jnp.zeros(self.hidden)

    def _cell(self, gates: Float[Array, " 4h"], c: Float[Array, " hidden"]) -> LSTMState:
        i, f, g, o = jnp.split(gates, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c

    def heads(self, h: Float[Array, " hidden"]) -> MDNOutputs:
        """New hidden state h_{t+1} -> predictions for z_{t+1}, r_t and done_t."""
        out = h @ self.head_weight + self.head_bias
        n = self.z_dim * self.n_mix
        mdn = out[:3 * n].reshape(3, self.z_dim, self.n_mix)
        return MDNOutputs(mdn[0], mdn[1], mdn[2], out[3 * n], out[3 * n + 1])

    def advance(self, state: LSTMState, z: Float[Array, " z_dim"], a: Float[Array, " action_dim"],
                mask: DropoutMask | None = None) -> LSTMState:
        """The LSTM update alone: (h_t, c_t), z_t, a_t -> (h_{t+1}, c_{t+1}); `mask`: dropout."""
        h, c = state
        x = jnp.concatenate([z, a])
        if mask is not None:
            x, h = x * mask[0], h * mask[1]
        return self._cell(jnp.concatenate([x, h]) @ self.weight + self.bias, c)

    def step(self, state: LSTMState, z: Float[Array, " z_dim"], a: Float[Array, " action_dim"],
             mask: DropoutMask | None = None) -> tuple[LSTMState, MDNOutputs]:
        """One step: (h_t, c_t), z_t, a_t -> (h_{t+1}, c_{t+1}), predictions."""
        state = self.advance(state, z, a, mask)
        return state, self.heads(state[0])

    def state_sequence(self, z_seq: Float[Array, "T z_dim"], a_seq: Float[Array, "T action_dim"],
                       state: LSTMState | None = None, mask: DropoutMask | None = None
                       ) -> tuple[Float[Array, "T hidden"], Float[Array, "T hidden"]]:
        """The LSTM alone over a sequence from `state` (default zeros), one lax.scan -> the states
        (h_{t+1}, c_{t+1}) after every step, each (T, hidden); `mask` (dropout) is the same at every step."""
        return self._scan(z_seq, a_seq, state, mask, keep_cell=True)

    def forward_sequence(self, z_seq: Float[Array, "T z_dim"], a_seq: Float[Array, "T action_dim"],
                         state: LSTMState | None = None, mask: DropoutMask | None = None) -> MDNOutputs:
        """Run over a sequence from `state` (default zeros) -> outputs with a time axis; `mask`
        (dropout) is the same at every step. The heads are applied to all steps at once."""
        hs, _ = self._scan(z_seq, a_seq, state, mask, keep_cell=False)
        return jax.vmap(self.heads)(hs)

    def _scan(self, z_seq, a_seq, state, mask, keep_cell: bool):
        # The input projection is applied to all steps at once, outside the scan; only the recurrent
        # matmul stays inside it. Without `keep_cell` only h is stacked (a lighter backward pass).
        n_in = self.z_dim + self.action_dim
        x = jnp.concatenate([z_seq, a_seq], axis=-1)
        m_h = 1.0 if mask is None else mask[1]
        gates_x = (x if mask is None else x * mask[0]) @ self.weight[:n_in] + self.bias
        w_h = self.weight[n_in:]

        def body(carry, gx):
            h, c = self._cell(gx + (carry[0] * m_h) @ w_h, carry[1])
            return (h, c), ((h, c) if keep_cell else (h, None))

        _, states = jax.lax.scan(body, self.initial_state() if state is None else state, gates_x)
        return states


def mdn_log_prob(out: MDNOutputs, z: Float[Array, "... z_dim"]) -> Float[Array, "... z_dim"]:
    """log p(z) per latent dimension under the per-dimension mixtures in `out` (any leading axes)."""
    log_sigma = out.log_sigma
    x = (z[..., None] - out.mu) * jnp.exp(-log_sigma)
    log_normal = -0.5 * x * x - log_sigma - LOG_SQRT_2PI
    return jax.nn.logsumexp(jax.nn.log_softmax(out.logits, axis=-1) + log_normal, axis=-1)


def mdn_mean(out: MDNOutputs) -> Float[Array, "... z_dim"]:
    """The expected value of each latent dimension's mixture: sum_k softmax(logits)_k * mu_k.
    Differentiable, so a prediction fed back as M's next input passes gradients through."""
    return jnp.sum(jax.nn.softmax(out.logits, axis=-1) * out.mu, axis=-1)


def sample_next_z(key: jax.Array, out: MDNOutputs, tau: float | Float[Array, ""] = 1.0
                  ) -> Float[Array, "... z_dim"]:
    """Draw z_{t+1} from the mixtures with temperature tau (logits / tau, sigma * sqrt(tau)).

    Per latent dimension two uniform numbers: the first picks the component by walking the
    mixture's cumulative weights (n_mix is small, so a running select beats a gather or n_mix
    Gumbel draws), the second becomes the standard normal noise through the inverse error function.
    """
    n_mix = out.mu.shape[-1]
    logits = [out.logits[..., k] / tau for k in range(n_mix)]  # slices: elementwise code, no reductions
    top = functools.reduce(jnp.maximum, logits)
    weight = [jnp.exp(lg - top) for lg in logits]  # unnormalised mixture weights
    # uniforms on [2^-24, 1): 2u - 1 then lies symmetric inside (-1, 1), where erfinv is finite
    u = jax.random.uniform(key, (2,) + out.mu.shape[:-1], minval=2.0 ** -24)
    target = u[0] * functools.reduce(jnp.add, weight)
    cum, mu, log_sigma = weight[0], out.mu[..., 0], out.log_sigma[..., 0]
    for k in range(1, n_mix):
        beyond = target >= cum  # the draw falls past components 0..k-1
        mu = jnp.where(beyond, out.mu[..., k], mu)
        log_sigma = jnp.where(beyond, out.log_sigma[..., k], log_sigma)
        cum = cum + weight[k]
    eps = math.sqrt(2.0) * jax.lax.erf_inv(2.0 * u[1] - 1.0)
    return mu + jnp.exp(log_sigma) * jnp.sqrt(tau) * eps


def _masked_mean(x: Array, mask: Array) -> Array:
    return jnp.sum(jnp.where(mask > 0, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


def open_loop_log_prob(model: MDNRNN, states: tuple[Float[Array, "T hidden"], Float[Array, "T hidden"]],
                       out: MDNOutputs, a_seq: Float[Array, "T action_dim"], z_next: Float[Array, "T z_dim"],
                       z_mask: Float[Array, " T"], steps: int, mask: DropoutMask | None = None
                       ) -> tuple[Float[Array, "T K z_dim"], Float[Array, "T K"]]:
    """M predicting K = `steps` frames ahead on its own, from every step of ONE teacher-forced sequence.

    `states` (h_{t+1}, c_{t+1}) and `out` (its predictions of z_{t+1}) come from `state_sequence` and
    `heads` over the real inputs. From each t, M runs open-loop: it feeds back its own expected next
    latent (`mdn_mean`) with the REAL next action,
        s_{t,0} = s_{t+1},   zhat_{t,k} = mdn_mean(heads(s_{t,k-1})),
        s_{t,k} = LSTM(s_{t,k-1}, [zhat_{t,k}, a_{t+k}])                      k = 1..K,
    and scores the real z_{t+k+1} under heads(s_{t,k}). Returns log p per latent dimension (T, K, z_dim)
    and where it counts (T, K): 1 when every frame from z_t to z_{t+k+1} is in the window (`z_mask`).
    `mask`: the sequence's dropout mask, the same as in its teacher-forced pass.
    """
    T = a_seq.shape[0]
    ahead = jnp.arange(T)[:, None] + jnp.arange(1, steps + 1)  # (T, K): t + k
    pad = lambda x: jnp.concatenate([x, jnp.zeros((steps,) + x.shape[1:], x.dtype)])  # noqa: E731
    actions, targets = pad(a_seq)[ahead], pad(z_next)[ahead]  # a_{t+k} and z_{t+k+1}: (T, K, ...)
    valid = z_mask[:, None] * jnp.cumprod(pad(z_mask)[ahead], axis=1)  # past the window's end: 0

    def from_step_t(state, out_t, actions_t, targets_t):
        def body(carry, inputs):
            state, out = carry
            a, z_target = inputs
            state = model.advance(state, mdn_mean(out), a, mask)
            out = model.heads(state[0])
            return (state, out), mdn_log_prob(out, z_target)

        _, log_p = jax.lax.scan(body, (state, out_t), (actions_t, targets_t))
        return log_p

    return jax.vmap(from_step_t)(states, out, actions, targets), valid


def mdnrnn_loss(model: MDNRNN, z_seq: Float[Array, "B T z_dim"], a_seq: Float[Array, "B T action_dim"],
                z_next: Float[Array, "B T z_dim"], reward: Float[Array, "B T"], done: Float[Array, "B T"],
                mask: Float[Array, "B T"], z_mask: Float[Array, "B T"] | None = None, *,
                w_mdn: float = 1.0, w_reward: float = 10.0, w_done: float = 10.0,
                reward_asymmetry: float = 1.0, reward_floor: float = -math.inf,
                done_pos_weight: float = 1.0, masks: DropoutMask | None = None,
                overshoot: int = 0, w_overshoot: float = 1.0) -> tuple[Array, dict]:
    """Loss of a batch of sequences -> (loss, {"nll", "reward_loss", "done_loss"} (+ "overshoot_nll")).

    loss = w_mdn * NLL + w_reward * reward loss + w_done * done BCE (defaults 1 / 10 / 10), each a mean
    over the valid steps (mask 1; padding 0). NLL is per step per latent dimension. The reward loss
    is a squared error in which over-prediction (predicted > real) counts `reward_asymmetry` times
    (1: plain MSE), so a dream that promises reward the real track would not give is penalised more.
    Reward targets below `reward_floor` are raised to it (the -100 of leaving the map would otherwise
    dominate the squared error; the done head carries that event). In the done BCE the rare positive
    targets weigh `done_pos_weight` times (so the head fires on them at all). `masks` (B, in) and
    (B, hidden): one dropout mask per sequence. `z_mask` (default `mask`) marks the steps whose next
    latent exists: the last step of an episode has a reward and a done target but no next frame.

    Overshooting (`overshoot` K > 0; PlaNet's latent overshooting, Hafner et al. 2019, with M's own
    expected z fed back): one step's effect of an action on z is tiny next to what M cannot predict,
    so the one-step NLL barely asks M to model actions; K steps open-loop (`open_loop_log_prob`) do:
        loss += w_overshoot * mean over valid (b, t, k <= K) and latent dims of
                -log p(z_{t+k+1} | s_{t,k}),   s_{t,k}: k open-loop steps on a_{t+1..t+k} from s_{t+1}.
    """
    z_mask = mask if z_mask is None else z_mask
    if overshoot > 0:  # the open-loop steps start from the teacher-forced states, so keep them
        states = jax.vmap(lambda z, a, m: model.state_sequence(z, a, None, m))(z_seq, a_seq, masks)
        out = jax.vmap(jax.vmap(model.heads))(states[0])
    else:
        out = jax.vmap(lambda z, a, m: model.forward_sequence(z, a, None, m))(z_seq, a_seq, masks)
    nll = _masked_mean(-jnp.mean(mdn_log_prob(out, z_next), axis=-1), z_mask)
    err = out.reward - jnp.maximum(reward, reward_floor)
    reward_loss = _masked_mean(jnp.where(err > 0, reward_asymmetry, 1.0) * err * err, mask)
    bce = -(done_pos_weight * done * jax.nn.log_sigmoid(out.done_logit)
            + (1.0 - done) * jax.nn.log_sigmoid(-out.done_logit))
    done_loss = _masked_mean(bce, mask)
    loss = w_mdn * nll + w_reward * reward_loss + w_done * done_loss
    aux = {"nll": nll, "reward_loss": reward_loss, "done_loss": done_loss}
    if overshoot > 0:
        def open_loop(states, out, a_seq, z_next, z_mask, mask):  # one sequence
            return open_loop_log_prob(model, states, out, a_seq, z_next, z_mask, overshoot, mask)

        log_p, valid = jax.vmap(open_loop)(states, out, a_seq, z_next, z_mask, masks)
        aux["overshoot_nll"] = _masked_mean(-jnp.mean(log_p, axis=-1), valid)
        loss = loss + w_overshoot * aux["overshoot_nll"]
    return loss, aux



def open_loop_means(model: MDNRNN, state: LSTMState, z0: Float[Array, " z_dim"],
                    actions: Float[Array, "H action_dim"]) -> Float[Array, "H z_dim"]:
    """M dreaming H steps from `state` and latent z0 on its own, fed its expected next latent
    (`mdn_mean`, differentiable) and the given actions -> those expected latents z_1..z_H."""
    def body(carry, a):
        state, z = carry
        state = model.advance(state, z, a)
        z = mdn_mean(model.heads(state[0]))
        return (state, z), z

    return jax.lax.scan(body, (state, z0), actions)[1]


def branch_loss(model: MDNRNN, warm_z: Float[Array, "B W z_dim"], warm_a: Float[Array, "B W action_dim"],
                z0: Float[Array, "B z_dim"], act_a: Float[Array, "B H action_dim"],
                act_b: Float[Array, "B H action_dim"], diff: Float[Array, "B H z_dim"]) -> Array:
    """What the wheel does, learnt from pairs of real futures of the same state (`data.branch_pairs`).

    M warms up on the W real steps before the branch point, then dreams H steps open-loop twice from
    the same state (`open_loop_means`): under the recorded actions (A) and under the branch's, which
    differ only in the steering (B). The difference of its two dreams must match the difference of the
    two real futures as V sees them:
        mean over pairs, steps k and latent dims of ((zhat^A_k - zhat^B_k) - (mu^A_k - mu^B_k))^2.
    Whatever M cannot predict about the road ahead is the same in both futures and cancels; what is
    left is the steering's effect, which the likelihood of single futures barely rewards modelling.
    """
    def one(wz, wa, z, aa, ab, d):
        hs, cs = model.state_sequence(wz, wa)
        state = (hs[-1], cs[-1])
        return jnp.mean((open_loop_means(model, state, z, aa) - open_loop_means(model, state, z, ab) - d) ** 2)

    return jnp.mean(jax.vmap(one)(warm_z, warm_a, z0, act_a, act_b, diff))


Batch = Mapping[str, Array | np.ndarray]
"""A batch of B episode windows of T steps, as `data.SequenceSampler.batch` makes it (a dict):
mu, logvar (B, T+1, z_dim): V's posterior of frames t..t+T; action (B, T, action_dim): the action
taken at each of the first T frames; reward, done (B, T): what followed each action; mask (B, T+1):
1 where the frame exists (windows at an episode's end are zero-padded; pad with zeros, not NaN)."""


def _sequences(batch: Batch, key: jax.Array | None, offroad_done: bool = False):
    """Batch -> the arguments of `mdnrnn_loss`; z drawn from N(mu, exp(logvar)) given a key, else mu.
    The done target is the episode's end, or with `offroad_done` the car leaving the road."""
    z = batch["mu"]
    if key is not None:
        z = z + jnp.exp(0.5 * batch["logvar"]) * jax.random.normal(key, z.shape)
    mask = batch["mask"]
    return (z[:, :-1], batch["action"], z[:, 1:], batch["reward"], batch["offroad" if offroad_done else "done"],
            mask[:, :-1], mask[:, :-1] * mask[:, 1:])


BRANCH_KEYS = ("warm_z", "warm_a", "z0", "act_a", "act_b", "diff")  # `data.branch_pairs`, in `branch_loss`'s order


def make_loss_fn(cfg: RNNConfig = RNNConfig(), branch_scale: float = 1.0):
    """`loss_fn(model, batch, key) -> (loss, aux)` for `wmlib.train.fit`, with the weights of `cfg`.

    Each call draws fresh z ~ N(mu, exp(logvar)) from `key` (the paper re-samples the training
    latents every epoch; here every batch), so M learns from V's uncertainty, not only its means.
    With `cfg.sample_z` False M learns from the means: V's per-frame noise (posterior std ~0.2 in the
    informative dimensions) is larger than one step's change of z (~0.06), and hides what an action
    does from one frame to the next. A batch with branch pairs (keys "branch_" + `BRANCH_KEYS`) adds
    `cfg.w_branch` times `branch_loss` over `branch_scale` (the pairs' mean squared real difference, so
    1 is what an M that ignores the wheel scores).
    """
    def loss_fn(model: MDNRNN, batch: Batch, key: jax.Array):
        k_z, k_drop = jax.random.split(key)
        masks = None
        if cfg.dropout > 0:
            B = batch["mu"].shape[0]
            masks = jax.vmap(lambda k: dropout_mask(k, cfg.dropout, model.z_dim + model.action_dim, model.hidden))(
                jax.random.split(k_drop, B))
        loss, aux = mdnrnn_loss(model, *_sequences(batch, k_z if cfg.sample_z else None, cfg.offroad_done),
                                w_mdn=cfg.w_mdn, w_reward=cfg.w_reward, w_done=cfg.w_done,
                                reward_asymmetry=cfg.reward_asymmetry, reward_floor=cfg.reward_floor,
                                done_pos_weight=cfg.done_pos_weight, masks=masks, overshoot=cfg.overshoot,
                                w_overshoot=cfg.w_overshoot)
        if "branch_diff" in batch:  # pairs of branches ride along (`train_mdnrnn`'s `branches`)
            pairs = [jnp.asarray(batch[f"branch_{k}"]) for k in BRANCH_KEYS]
            aux["branch"] = branch_loss(model, *pairs) / branch_scale
            loss = loss + cfg.w_branch * aux["branch"]
        return loss, aux
    return loss_fn


def make_optimizer(cfg: RNNConfig = RNNConfig()) -> optax.GradientTransformation:
    """Adam (1e-3) after clipping the global gradient norm (1.0)."""
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adam(cfg.learning_rate))


def make_train_step(optimizer: optax.GradientTransformation | None = None, cfg: RNNConfig = RNNConfig()):
    """Jitted `step(model, opt_state, batch, key) -> (model, opt_state, loss, aux)`; the sequences of
    the batch are vmapped through `forward_sequence`. Default optimiser: `make_optimizer(cfg)`."""
    return make_step(make_loss_fn(cfg), make_optimizer(cfg) if optimizer is None else optimizer)


@eqx.filter_jit
def _metric_sums(model: MDNRNN, batch: Batch, offroad_done: bool = False) -> dict:
    z_seq, a_seq, z_next, reward, done, mask, z_mask = _sequences(batch, None, offroad_done)
    out = jax.vmap(model.forward_sequence)(z_seq, a_seq)
    on = mask > 0
    r, p = jnp.where(on, reward, 0.0), jnp.where(on, out.reward, 0.0)
    pred, real = on & (out.done_logit > 0.0), on & (done > 0.5)
    return {"n": jnp.sum(mask), "n_z": jnp.sum(z_mask),
            "nll": jnp.sum(jnp.where(z_mask > 0, -jnp.sum(mdn_log_prob(out, z_next), axis=-1), 0.0)),
            "abs_err": jnp.sum(jnp.abs(p - r)), "r": jnp.sum(r), "p": jnp.sum(p), "rr": jnp.sum(r * r),
            "pp": jnp.sum(p * p), "rp": jnp.sum(r * p), "tp": jnp.sum(pred & real),
            "fp": jnp.sum(pred & ~real), "fn": jnp.sum(~pred & real)}


def validation_metrics(model: MDNRNN, batches: Iterable[Batch], offroad_done: bool = False) -> dict:
    """Held-out metrics over batches (inputs are V's means, no sampling):
    nll_per_step (summed over latent dims), nll_per_dim, reward_mae, reward_corr (Pearson),
    done_precision and done_recall (predicted done when sigmoid(logit) > 0.5; NaN when undefined)
    of the done target M was trained on (`offroad_done`: leaving the road).
    """
    s: dict[str, float] = {}
    for batch in batches:
        for k, v in _metric_sums(model, batch, offroad_done).items():
            s[k] = s.get(k, 0.0) + float(v)
    if not s or s["n"] == 0:
        raise ValueError("validation_metrics got no valid steps (empty batches or all-zero masks)")
    n, nz = s["n"], max(s["n_z"], 1.0)
    cov = s["rp"] / n - s["r"] / n * s["p"] / n
    var_r, var_p = s["rr"] / n - (s["r"] / n) ** 2, s["pp"] / n - (s["p"] / n) ** 2
    ratio = lambda a, b: a / b if b > 0 else float("nan")  # noqa: E731
    return {"nll_per_step": s["nll"] / nz, "nll_per_dim": s["nll"] / nz / model.z_dim,
            "reward_mae": s["abs_err"] / n, "reward_corr": ratio(cov, math.sqrt(max(var_r * var_p, 0.0))),
            "done_precision": ratio(s["tp"], s["tp"] + s["fp"]), "done_recall": ratio(s["tp"], s["tp"] + s["fn"])}


def train_mdnrnn(encoded: dict[str, dict[str, np.ndarray]], run_dir: str | os.PathLike,
                 cfg: RNNConfig = RNNConfig(), vae_id: str = "", init: MDNRNN | None = None,
                 progress: bool = True, branches: dict[str, np.ndarray] | None = None) -> MDNRNN:
    """Train M on V's encodings (`data.load_encoded`) with `train.fit`; writes RUN_DIR/mdnrnn.eqx.

    `cfg.val_episodes` episodes (with their mirror images) are held out for `validation_metrics`,
    logged after every epoch. `init` continues from an earlier M (the sim2real iterations); a
    stopped run resumes from its training state. The checkpoint's extra records `vae_id`, the V
    whose latents M learned. `branches` (`data.branch_pairs`): every batch also holds
    `cfg.batch_size` pairs drawn from them, for the branch term (`branch_loss`, logged as "branch").
    """
    if not encoded:
        raise WMError("train_mdnrnn got no encoded episodes; run the encode stage first")
    train_names, val_names = split_episodes(encoded, cfg.val_episodes, cfg.seed)
    sampler = SequenceSampler([encoded[n] for n in train_names], cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    val_batches = (SequenceSampler([encoded[n] for n in val_names], cfg.seq_len, cfg.batch_size).all_windows()
                   if val_names else [])
    z_dim = next(iter(encoded.values()))["mu"].shape[1]
    model = init if init is not None else MDNRNN(jax.random.PRNGKey(cfg.seed), z_dim=z_dim, hidden=cfg.hidden,
                                                 n_mix=cfg.n_mix)
    if model.z_dim != z_dim:
        raise WMError(f"the initial M has z_dim {model.z_dim} but the encodings have z_dim {z_dim}")
    batch_fn, scale = sampler.batch, 1.0
    if branches is not None:
        scale = float(np.mean(branches["diff"] ** 2))

        def batch_fn(index: int) -> dict[str, np.ndarray]:  # deterministic in index, like the windows
            picked = np.random.default_rng([cfg.seed, index]).integers(len(branches["diff"]), size=cfg.batch_size)
            return {**sampler.batch(index), **{f"branch_{k}": branches[k][picked] for k in BRANCH_KEYS}}
    return fit(model, make_optimizer(cfg), make_loss_fn(cfg, scale), batch_fn, cfg.epochs * sampler.batches_per_epoch,
               run_dir, name="mdnrnn", hyper=mdnrnn_hyper(model), seed=cfg.seed,
               evaluate=(lambda m: validation_metrics(m, val_batches, cfg.offroad_done)) if val_batches else None,
               eval_every=sampler.batches_per_epoch, extra={"vae_id": vae_id}, progress=progress)


def mdnrnn_hyper(model: MDNRNN) -> dict:
    """The header hyperparameters that rebuild `model` (also what `train.fit` wants as `hyper`)."""
    return {"z_dim": model.z_dim, "action_dim": model.action_dim, "hidden": model.hidden, "n_mix": model.n_mix}


def save_mdnrnn(path: str | os.PathLike, model: MDNRNN, extra: dict | None = None):
    """Write an MDN-RNN checkpoint (kind "mdnrnn", hyper: z_dim, action_dim, hidden, n_mix)."""
    return checkpoint.save(path, model, "mdnrnn", mdnrnn_hyper(model), extra)


def load_mdnrnn(path: str | os.PathLike) -> tuple[MDNRNN, dict]:
    """Read an MDN-RNN checkpoint -> (model, header)."""
    return checkpoint.load(path, "mdnrnn", lambda h: MDNRNN(jax.random.PRNGKey(0), **h))


# ---- a 1-D mixture density network, for teaching -------------------------------------------------

class ToyMDN(eqx.Module):
    """x (scalar) -> a mixture of n_mix Gaussians over y (scalar), with M's own head layout and NLL.

    With n_mix = 1 it is ordinary regression with a Gaussian likelihood (its mean is the least-squares
    fit); with more components it can represent a y that has several likely values for one x.
    """
    mlp: eqx.nn.MLP
    n_mix: int = eqx.field(static=True)

    def __init__(self, key: jax.Array, n_mix: int = 5, width: int = 32):
        self.n_mix = n_mix
        self.mlp = eqx.nn.MLP(1, 3 * n_mix, width, 2, activation=jnp.tanh, key=key)

    def __call__(self, x: Float[Array, ""]) -> MDNOutputs:
        out = self.mlp(jnp.reshape(x, (1,))).reshape(3, 1, self.n_mix)
        return MDNOutputs(out[0], out[1], out[2], jnp.zeros(()), jnp.zeros(()))


def fit_toy_mdn(x: np.ndarray, y: np.ndarray, n_mix: int = 5, steps: int = 2000, seed: int = 0,
                learning_rate: float = 1e-2) -> tuple[ToyMDN, list[float]]:
    """Fit a ToyMDN to points (x, y) by minimising the mixture NLL (full batch Adam) -> (model, losses)."""
    def loss_fn(model, batch, key):
        xs, ys = batch
        nll = -jnp.mean(mdn_log_prob(jax.vmap(model)(xs), ys[:, None]))
        return nll, {}

    model = ToyMDN(jax.random.PRNGKey(seed), n_mix)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_step(loss_fn, optimizer)
    batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    losses = []
    for _ in range(steps):
        model, opt_state, loss, _ = step(model, opt_state, batch, None)
        losses.append(float(loss))
    return model, losses


def sample_toy_mdn(model: ToyMDN, xs: np.ndarray, key: jax.Array, tau: float = 1.0) -> np.ndarray:
    """One y for every x in `xs` (N,) from the fitted toy, at temperature tau as M dreams
    (`sample_next_z`: logits / tau, sigma * sqrt(tau)) -> (N,)."""
    out = jax.vmap(model)(jnp.asarray(xs, jnp.float32))
    ys = jax.vmap(lambda k, o: sample_next_z(k, o, tau))(jax.random.split(key, len(xs)), out)
    return np.asarray(ys)[:, 0]
