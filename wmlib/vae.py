"""V, the convolutional VAE (paper section 2.1 and appendix A.1).

Architecture, exactly the paper's (4,348,547 parameters). A frame is (64, 64, 3) in [0, 1], HWC.
    encoder  conv 32, 64, 128, 256 filters, 4x4, stride 2, VALID, ReLU: 64 -> 31 -> 14 -> 6 -> 2
             flatten (2, 2, 256) -> 1024 in (h, w, c) order; dense -> mu (32), dense -> logvar (32)
    decoder  dense 32 -> 1024, seen as a (1, 1, 1024) image; transposed convs, stride 2, VALID:
             128 5x5 ReLU (-> 5x5), 64 5x5 ReLU (-> 13x13), 32 6x6 ReLU (-> 30x30), 3 6x6 sigmoid (-> 64x64)
    loss     sum over pixels of the squared error + KL, the KL (summed over latent dims) clipped below
             at kl_tolerance * z_dim (free bits, 0.5 * 32), both averaged over the batch, as in the
             paper's code. Adam, learning rate 1e-4, batch 100.

Shapes: every layer and `ConvVAE.encode` / `decode` / `__call__` take any number of leading batch
axes: one frame (64, 64, 3) or a batch (B, 64, 64, 3). `jax.vmap` over single frames works and gives
the same numbers; training calls the model on the whole batch, which is faster on a CPU.

Fast or plain layers. `conv2d` and `conv_transpose2d` below are the convolutions, written with
`jax.lax`. `ConvVAE(key, fast=True)` (the default, what training and checkpoints use) computes the
same with `wmlib.fast.conv`'s hand-written im2col kernels, several times faster for the training
step on a CPU; `fast=False` uses the lax ones. The parameters are the same either way
(tests/test_vae.py checks that both give the same values and gradients).
"""

from __future__ import annotations

import functools
import math
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jaxtyping import Array, Float, UInt8

from wmlib import checkpoint
from wmlib.config import VAEConfig
from wmlib.data import FrameSampler, episode_files, load_episode, split_episodes
from wmlib.errors import WMError
from wmlib.fast import conv as fast_conv
from wmlib.train import fit, make_step

FRAME_SHAPE = (64, 64, 3)
STRIDE = 2
LAYOUT = ("NHWC", "HWIO", "NHWC")  # images channels last; convolution kernels (k, k, Cin, Cout)


# ---- layers ---------------------------------------------------------------------------------------

def conv2d(x: Float[Array, "N H W Cin"], w: Float[Array, "k k Cin Cout"]) -> Float[Array, "N Ho Wo Cout"]:
    """Stride-2 VALID convolution (cross-correlation, as in every deep-learning library), Ho = (H - k) // 2 + 1."""
    return lax.conv_general_dilated(x, w, (STRIDE, STRIDE), "VALID", dimension_numbers=LAYOUT)


def conv_transpose2d(x: Float[Array, "N H W Cin"], w: Float[Array, "Cin k k Cout"]
                     ) -> Float[Array, "N Ho Wo Cout"]:
    """Stride-2 VALID transposed convolution: y[2i + a, 2j + b] += x[i, j] @ w[:, a, b], Ho = 2(H - 1) + k.

    The kernel is stored (Cin, k, k, Cout) (PyTorch's ConvTranspose2d layout, channels last). It is
    the gradient of the convolution (Cout -> Cin channels) whose HWIO kernel is w.transpose(1, 2, 3, 0),
    which `transpose_kernel=True` asks lax for; so it acts as in PyTorch and TensorFlow.
    """
    return lax.conv_transpose(x, w.transpose(1, 2, 3, 0), (STRIDE, STRIDE), "VALID", dimension_numbers=LAYOUT,
                              transpose_kernel=True)


def _uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> Array:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for Linear and Conv2d weights and biases
    (here also for the transposed convolutions, with fan_in = Cin * k * k)."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, minval=-bound, maxval=bound)


def _batched(fn, x: Array, event_dims: int) -> Array:
    """Apply `fn` (which wants exactly one batch axis) to x with any number of leading batch axes."""
    lead = x.shape[:x.ndim - event_dims]
    y = fn(x.reshape(-1, *x.shape[len(lead):]))
    return y.reshape(*lead, *y.shape[1:])


class Conv2d(eqx.Module):
    """`conv2d` + bias; (..., H, W, Cin) -> (..., Ho, Wo, Cout). fast: `wmlib.fast.conv.conv2d` instead."""
    weight: Float[Array, "k k Cin Cout"]
    bias: Float[Array, " Cout"]
    fast: bool = eqx.field(static=True)

    def __init__(self, key: jax.Array, cin: int, cout: int, k: int, fast: bool = True):
        wkey, bkey = jax.random.split(key)
        self.weight = _uniform(wkey, (k, k, cin, cout), k * k * cin)
        self.bias = _uniform(bkey, (cout,), k * k * cin)
        self.fast = fast

    def __call__(self, x: Float[Array, "... H W Cin"]) -> Float[Array, "... Ho Wo Cout"]:
        conv = fast_conv.conv2d if self.fast else conv2d
        return _batched(lambda x: conv(x, self.weight), x, 3) + self.bias


class ConvTranspose2d(eqx.Module):
    """`conv_transpose2d` + bias; (..., H, W, Cin) -> (..., Ho, Wo, Cout). fast: `wmlib.fast.conv`'s."""
    weight: Float[Array, "Cin k k Cout"]
    bias: Float[Array, " Cout"]
    fast: bool = eqx.field(static=True)

    def __init__(self, key: jax.Array, cin: int, cout: int, k: int, fast: bool = True):
        wkey, bkey = jax.random.split(key)
        self.weight = _uniform(wkey, (cin, k, k, cout), k * k * cin)
        self.bias = _uniform(bkey, (cout,), k * k * cin)
        self.fast = fast

    def __call__(self, x: Float[Array, "... H W Cin"]) -> Float[Array, "... Ho Wo Cout"]:
        conv = fast_conv.conv_transpose2d if self.fast else conv_transpose2d
        return _batched(lambda x: conv(x, self.weight), x, 3) + self.bias


class Linear(eqx.Module):
    """x @ W + b with W stored (in, out), so a batch is one matrix product; (..., in) -> (..., out)."""
    weight: Float[Array, "fan_in fan_out"]
    bias: Float[Array, " fan_out"]

    def __init__(self, key: jax.Array, fan_in: int, fan_out: int):
        wkey, bkey = jax.random.split(key)
        self.weight = _uniform(wkey, (fan_in, fan_out), fan_in)
        self.bias = _uniform(bkey, (fan_out,), fan_in)

    def __call__(self, x: Float[Array, "... fan_in"]) -> Float[Array, "... fan_out"]:
        return x @ self.weight + self.bias


# ---- the VAE --------------------------------------------------------------------------------------

ENCODER = ((3, 32), (32, 64), (64, 128), (128, 256))           # (in, out) channels, 4x4 kernels
DECODER = ((1024, 128, 5), (128, 64, 5), (64, 32, 6), (32, 3, 6))  # (in, out) channels, kernel


class ConvVAE(eqx.Module):
    """The paper's ConvVAE; every method takes one frame / latent or a batch (leading axes).

    fast=True: the convolutions run as `wmlib.fast.conv`'s kernels; fast=False: as `conv2d` and
    `conv_transpose2d` (lax). Same parameters, same function."""
    encoder: tuple[Conv2d, ...]
    mu: Linear
    logvar: Linear
    decoder_in: Linear
    decoder: tuple[ConvTranspose2d, ...]
    z_dim: int = eqx.field(static=True)

    def __init__(self, key: jax.Array, z_dim: int = 32, fast: bool = True):
        keys = jax.random.split(key, len(ENCODER) + len(DECODER) + 3)
        self.z_dim = z_dim
        self.encoder = tuple(Conv2d(kk, cin, cout, 4, fast) for kk, (cin, cout) in zip(keys, ENCODER))
        self.mu = Linear(keys[4], 1024, z_dim)
        self.logvar = Linear(keys[5], 1024, z_dim)
        self.decoder_in = Linear(keys[6], z_dim, 1024)
        self.decoder = tuple(ConvTranspose2d(kk, cin, cout, k, fast)
                             for kk, (cin, cout, k) in zip(keys[7:], DECODER))

    def encode(self, x: Float[Array, "... 64 64 3"]) -> tuple[Float[Array, "... z"], Float[Array, "... z"]]:
        """Frames in [0, 1] -> posterior mean and log-variance."""
        h = x
        for layer in self.encoder:
            h = jax.nn.relu(layer(h))
        h = h.reshape(*h.shape[:-3], -1)  # (..., 2, 2, 256) -> (..., 1024), (h, w, c) order
        return self.mu(h), self.logvar(h)

    def decode(self, z: Float[Array, "... z"]) -> Float[Array, "... 64 64 3"]:
        """Latents -> frames in [0, 1]."""
        h = self.decoder_in(z)[..., None, None, :]  # (..., 1, 1, 1024)
        for layer in self.decoder[:-1]:
            h = jax.nn.relu(layer(h))
        return jax.nn.sigmoid(self.decoder[-1](h))

    def __call__(self, x: Float[Array, "... 64 64 3"], key: jax.Array
                 ) -> tuple[Float[Array, "... 64 64 3"], Float[Array, "... z"], Float[Array, "... z"]]:
        """Frames -> (reconstruction of z ~ N(mu, exp(logvar)), mu, logvar)."""
        mu, logvar = self.encode(x)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)
        return self.decode(z), mu, logvar


def check_frames(frames, where: str = "frames") -> None:
    """Raise a ValueError unless `frames` is a (B, 64, 64, 3) uint8 batch."""
    shape, dtype = tuple(np.shape(frames)), getattr(frames, "dtype", None)
    if len(shape) != 4 or shape[1:] != FRAME_SHAPE or dtype != np.uint8:
        raise ValueError(f"{where}: expected a batch of frames of shape (B, 64, 64, 3) and dtype uint8, "
                         f"got shape {shape} and dtype {dtype}")


def vae_loss(vae: ConvVAE, frames: UInt8[Array, "B 64 64 3"], key: jax.Array, kl_tolerance: float = 0.5
             ) -> tuple[Float[Array, ""], dict]:
    """Loss of a batch of uint8 frames -> (loss, {"recon", "kl"}), the paper's code:
    loss = mean_b [ sum_pixels (recon - x)^2 + max(KL_b, kl_tolerance * z_dim) ],
    KL_b = -0.5 * sum_d (1 + logvar - mu^2 - exp(logvar)). aux holds the batch means of the
    reconstruction error and of the unclipped KL."""
    check_frames(frames)
    x = frames.astype(jnp.float32) / 255.0
    recon, mu, logvar = vae(x, key)
    recon_loss = jnp.sum(jnp.square(recon - x), axis=(1, 2, 3))
    kl = -0.5 * jnp.sum(1.0 + logvar - jnp.square(mu) - jnp.exp(logvar), axis=-1)
    loss = jnp.mean(recon_loss + jnp.maximum(kl, kl_tolerance * vae.z_dim))
    return loss, {"recon": jnp.mean(recon_loss), "kl": jnp.mean(kl)}


# ---- training -------------------------------------------------------------------------------------

def make_optimizer(learning_rate: float = 1e-4) -> optax.GradientTransformation:
    """Adam, as in the paper (learning rate 1e-4)."""
    return optax.adam(learning_rate)


def make_loss_fn(kl_tolerance: float = 0.5):
    """`loss_fn(vae, frames, key) -> (loss, aux)` for `wmlib.train.fit`: `vae_loss` with this tolerance."""
    return functools.partial(vae_loss, kl_tolerance=kl_tolerance)


def make_train_step(optimizer: optax.GradientTransformation | None = None, kl_tolerance: float = 0.5):
    """Jitted `step(vae, opt_state, frames, key) -> (vae, opt_state, loss, aux)` on a (B, 64, 64, 3)
    uint8 batch; the batch goes through the model at once (no vmap). Default optimiser: Adam 1e-4.
    `opt_state` is `optimizer.init(eqx.filter(vae, eqx.is_inexact_array))`."""
    return make_step(make_loss_fn(kl_tolerance), make_optimizer() if optimizer is None else optimizer)


@eqx.filter_jit
def _loss_sums(vae: ConvVAE, frames: UInt8[Array, "B 64 64 3"], key: jax.Array, kl_tolerance: float) -> Array:
    loss, aux = vae_loss(vae, frames, key, kl_tolerance)
    return jnp.stack([loss, aux["recon"], aux["kl"]]) * frames.shape[0]


def validation_metrics(vae: ConvVAE, frames: np.ndarray, batch: int = 100, kl_tolerance: float = 0.5,
                       seed: int = 0) -> dict:
    """Held-out metrics over uint8 `frames`, in batches of `batch`, z drawn with a fixed seed so that
    successive evaluations compare: "loss", "recon", "kl" as in `vae_loss` (means per frame),
    "pixel_mse" (recon per pixel and channel) and "mean_frame_mse", the same error of always
    predicting the average frame of `frames` (the baseline V must beat)."""
    check_frames(frames, "validation frames")
    sums = np.zeros(3)
    for i, start in enumerate(range(0, len(frames), batch)):
        sums += np.asarray(_loss_sums(vae, jnp.asarray(frames[start:start + batch]),
                                      jax.random.fold_in(jax.random.PRNGKey(seed), i), kl_tolerance))
    loss, recon, kl = (sums / len(frames)).tolist()
    x = frames.astype(np.float32) / 255.0
    return {"loss": loss, "recon": recon, "kl": kl, "pixel_mse": recon / x[0].size,
            "mean_frame_mse": float(np.mean(np.square(x - x.mean(axis=0))))}


def _episode_split(files: list, n_val: int, seed: int) -> tuple[list, list]:
    """Episode files -> (train, validation) with `n_val` episodes held out, each with its mirror."""
    by_name = {p.name: p for p in files}
    train, val = split_episodes(by_name, n_val, seed)
    return [by_name[n] for n in train], [by_name[n] for n in val]


def _validation_frames(files: list, n: int, seed: int) -> np.ndarray:
    """`n` frames drawn at random (fixed seed) from the episodes in `files`, uint8 (n, 64, 64, 3)."""
    frames = np.concatenate([load_episode(p).frames for p in files])
    return frames[np.sort(np.random.default_rng(seed).permutation(len(frames))[:n])]


def train_vae(data_dir: str | os.PathLike, run_dir: str | os.PathLike, cfg: VAEConfig = VAEConfig(),
              init: ConvVAE | None = None, progress: bool = True) -> ConvVAE:
    """Train V on the frames of a collection with `train.fit`; writes RUN_DIR/vae.eqx.

    Batches of `cfg.batch_size` random frames (`data.FrameSampler`, mirrored at random with
    `cfg.mirror`); `cfg.val_episodes` episodes (with their mirror images) are held out and
    `cfg.val_frames` of their frames give `validation_metrics` every `cfg.eval_every` steps. `init`
    continues from an earlier V; a stopped run resumes from its training state.
    """
    files = episode_files(data_dir)
    if not files:
        raise WMError(f"train_vae: collection folder {data_dir} holds no episodes")
    train_files, val_files = _episode_split(files, cfg.val_episodes, cfg.seed)
    sampler = FrameSampler(train_files, cfg.batch_size, seed=cfg.seed, mirror=cfg.mirror)
    val = _validation_frames(val_files, cfg.val_frames, cfg.seed) if val_files else None
    vae = init if init is not None else ConvVAE(jax.random.PRNGKey(cfg.seed), cfg.z_dim)
    optimizer = make_optimizer(cfg.learning_rate)
    return fit(vae, optimizer, make_loss_fn(cfg.kl_tolerance), sampler.batch, cfg.steps,
               run_dir, name="vae", hyper=vae_hyper(vae), seed=cfg.seed,
               evaluate=(lambda m: validation_metrics(m, val, cfg.batch_size, cfg.kl_tolerance, cfg.seed))
               if val is not None else None, eval_every=cfg.eval_every, progress=progress,
               step_fn=make_train_step(optimizer, cfg.kl_tolerance))


# ---- checkpoints and whole-episode helpers ---------------------------------------------------------

def vae_hyper(vae: ConvVAE) -> dict:
    """The header hyperparameters that rebuild `vae`."""
    return {"z_dim": vae.z_dim}


def save_vae(path: str | os.PathLike, vae: ConvVAE, extra: dict | None = None):
    """Write a V checkpoint (kind "vae", hyper: z_dim)."""
    return checkpoint.save(path, vae, "vae", vae_hyper(vae), extra)


def load_vae(path: str | os.PathLike) -> tuple[ConvVAE, dict]:
    """Read a V checkpoint -> (vae, header); a file of another kind raises `CheckpointError`."""
    return checkpoint.load(path, "vae", lambda h: ConvVAE(jax.random.PRNGKey(0), **h))


@eqx.filter_jit
def _encode_batch(vae: ConvVAE, frames: UInt8[Array, "B 64 64 3"]):
    return vae.encode(frames.astype(jnp.float32) / 255.0)


@eqx.filter_jit
def _reconstruct_batch(vae: ConvVAE, frames: UInt8[Array, "B 64 64 3"]):
    return vae.decode(vae.encode(frames.astype(jnp.float32) / 255.0)[0])


@eqx.filter_jit
def _decode_batch(vae: ConvVAE, z: Float[Array, "B z"]):
    return vae.decode(z)


def _in_batches(fn, vae: ConvVAE, inputs: np.ndarray, batch: int):
    """fn(vae, chunk) over `inputs` (frames or latents) in chunks of `batch`, outputs concatenated as
    numpy arrays. Chunks are zero-padded to `batch` (or, for fewer inputs, to the next power of two),
    so episodes of any length share a handful of compiled shapes."""
    inputs = np.asarray(inputs)
    if len(inputs) == 0:
        raise ValueError(f"got an empty batch {inputs.shape}; there is nothing to encode or decode")
    size = min(batch, 1 << (len(inputs) - 1).bit_length())
    outs = []
    for start in range(0, len(inputs), size):
        chunk = inputs[start:start + size]
        n = len(chunk)
        chunk = np.concatenate([chunk, np.zeros((size - n, *inputs.shape[1:]), inputs.dtype)])
        outs.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], fn(vae, jnp.asarray(chunk))))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


def encode_frames(vae: ConvVAE, frames: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames (T, 64, 64, 3) -> numpy (mu, logvar), each (T, z_dim) float32 (a whole episode)."""
    check_frames(frames)
    return _in_batches(_encode_batch, vae, frames, batch)


def reconstruct(vae: ConvVAE, frames: np.ndarray, batch: int = 1000) -> np.ndarray:
    """uint8 frames (T, 64, 64, 3) -> their reconstructions decode(mu), float32 in [0, 1] (deterministic)."""
    check_frames(frames)
    return _in_batches(_reconstruct_batch, vae, frames, batch)


def decode_latents(vae: ConvVAE, z: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Latents (N, z_dim) -> frames (N, 64, 64, 3), float32 in [0, 1]."""
    z = np.asarray(z, np.float32)
    if z.ndim != 2 or z.shape[1] != vae.z_dim:
        raise ValueError(f"decode_latents: expected latents of shape (N, {vae.z_dim}), got {z.shape}")
    return _in_batches(_decode_batch, vae, z, batch)
