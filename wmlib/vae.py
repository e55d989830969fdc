"""V, the convolutional VAE (paper section 2.1 and appendix A.1), fast on CPUs.

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
the same numbers, but training calls the model on the whole batch because then each layer is ONE
big matrix product, which is several times faster on a CPU than a vmapped batch of small ones.

Why the layers are written by hand. XLA's CPU backend computes the kernel gradient of a strided
transposed convolution very slowly (seconds per step here) and its strided convolutions are
mediocre. So each layer is im2col + one matrix product, and `jax.custom_vjp` gives its gradients as
two more matrix products, so XLA cannot build a slow backward pass of its own (W as a matrix):
    conv2d            y = im2col(x) W          dW = im2col(x)^T dy      dx = col2im(dy W^T)
    conv_transpose2d  y = col2im(x W)          dW = x^T im2col(dy)      dx = im2col(dy) W^T
(the transposed convolution is the adjoint of the convolution in x). `_im2col` is one gather (every
stride-2 window as a row), which XLA runs near memory speed, unlike a concatenation of k*k strided
slices; `_col2im`, its adjoint, adds the k*k taps back in space-to-depth layout, where each tap is a
shift by whole pixels (a zero pad that XLA fuses into one sum), then interleaves the stride phases
(depth-to-space). Each layer runs over the batch in chunks of a few examples (`_chunked`), which
keeps the im2col buffers in cache and lets XLA run the chunks concurrently on all cores; and the
process keeps freed memory for reuse (`wmlib.reuse_freed_memory`, on `import wmlib`), because XLA
allocates its scratch buffers afresh on every call and the kernel's zero-filling of new pages cost
more than some layers' arithmetic. The mathematics is that of
`jax.lax.conv_general_dilated` and `jax.lax.conv_transpose` (tests/test_vae.py checks values and
gradients against both); bench/vae_speed.py times the training step against PyTorch.
"""

from __future__ import annotations

import functools
import math
import operator
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, UInt8

from wmlib import checkpoint
from wmlib.config import VAEConfig
from wmlib.data import FrameSampler, episode_files, load_episode, split_episodes
from wmlib.train import fit, make_step

FRAME_SHAPE = (64, 64, 3)
STRIDE = 2


# ---- im2col / col2im for stride-2 VALID windows ---------------------------------------------------

def _out_size(size: int, k: int) -> int:
    """Output length of a stride-2 VALID convolution with kernel k over `size` pixels."""
    return (size - k) // STRIDE + 1


def _im2col(x: Float[Array, "N H W C"], k: int) -> Float[Array, "N Ho Wo kkC"]:
    """Every stride-2 k x k window of x as one row: p[n, i, j, (a, b, c)] = x[n, 2i + a, 2j + b, c].

    One gather, which XLA runs at memory speed, unlike a concatenation of k * k strided slices.
    """
    n, h, w, c = x.shape
    rows = STRIDE * np.arange(_out_size(h, k))[:, None, None, None] + np.arange(k)[None, None, :, None]
    cols = STRIDE * np.arange(_out_size(w, k))[None, :, None, None] + np.arange(k)[None, None, None, :]
    return x[:, rows, cols].reshape(n, rows.shape[0], cols.shape[1], k * k * c)


def _col2im(z: Float[Array, "N Ho Wo kkC"], k: int, h: int, w: int) -> Float[Array, "N h w C"]:
    """The adjoint of `_im2col`: x[n, 2i + a, 2j + b, c] += z[n, i, j, (a, b, c)], x of size (h, w).

    Tap a = 2s + p (p the stride phase) lands at s pixels below in the space-to-depth image whose
    channels are (p, q, c); the kernel is zero-padded to an even size ka * 2 so that every tap has a
    place, the ka * ka shifted copies are summed (XLA fuses the pads and the sum into one loop), and
    depth-to-space gives the image, cropped or zero-padded to (h, w).
    """
    n, ho, wo, kkc = z.shape
    c, ka = kkc // (k * k), (k + 1) // 2
    z = z.reshape(n, ho, wo, k, k, c)
    z = jnp.pad(z, ((0, 0),) * 3 + ((0, 2 * ka - k),) * 2 + ((0, 0),))
    z = z.reshape(n, ho, wo, ka, 2, ka, 2, c).transpose(0, 1, 2, 3, 5, 4, 6, 7).reshape(n, ho, wo, ka, ka, 4 * c)
    hs, ws = ho + ka - 1, wo + ka - 1
    s2d = functools.reduce(operator.add, (jnp.pad(z[:, :, :, a, b],
                                                  ((0, 0), (a, hs - ho - a), (b, ws - wo - b), (0, 0)))
                                          for a in range(ka) for b in range(ka)))
    x = s2d.reshape(n, hs, ws, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * hs, 2 * ws, c)
    x = x[:, :h, :w]
    return jnp.pad(x, ((0, 0), (0, h - x.shape[1]), (0, w - x.shape[2]), (0, 0)))


def _matmul(a: Array, b: Float[Array, "K M"]) -> Array:
    """a (..., K) @ b (K, M) as one 2-D matrix product over all leading axes of a."""
    return (a.reshape(-1, a.shape[-1]) @ b).reshape(*a.shape[:-1], b.shape[-1])


def _gram(a: Array, b: Array) -> Array:
    """sum over all leading axes of a (..., K) x b (..., M) outer products: the (K, M) weight gradient."""
    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


CHUNK_BYTES = 8 * 2**20


def _chunked(body, carry, xs: tuple[Array, ...], row_bytes: int):
    """`body(carry, chunk_of_xs) -> (carry, y)` over chunks of the batch (axis 0 of every x), each
    chunk's im2col buffer (`row_bytes` per example) near CHUNK_BYTES. Returns (carry, the ys
    concatenated over the batch).

    Why chunks: at batch 100 an unchunked layer's im2col buffer is up to 78 MB, ~300 MB per step,
    which does not stay in cache; a chunk of a few examples does. Why a Python loop and not
    `lax.scan`: the chunks are then independent operations that XLA's CPU runtime executes
    concurrently on all cores (a scan runs them one after another, and fills a zeroed buffer with
    dynamic updates). The weight gradient is summed over the chunks in the carry.
    """
    n = xs[0].shape[0]
    n_chunks = max(1, -(-n * row_bytes // CHUNK_BYTES))
    size = -(-n // n_chunks)
    ys = []
    for start in range(0, n, size):
        carry, y = body(carry, tuple(x[start:start + size] for x in xs))
        ys.append(y)
    return carry, jnp.concatenate(ys) if len(ys) > 1 else ys[0]


# ---- the two layer operations, with their gradients as matrix products ----------------------------

def _patch_bytes(x: Array, k: int) -> int:
    """Bytes of one example's im2col rows (float32) for stride-2 k x k windows over x (N, H, W, C)."""
    return 4 * _out_size(x.shape[1], k) * _out_size(x.shape[2], k) * k * k * x.shape[3]


@jax.custom_vjp
def conv2d(x: Float[Array, "N H W Cin"], w: Float[Array, "k k Cin Cout"]) -> Float[Array, "N Ho Wo Cout"]:
    """Stride-2 VALID convolution (cross-correlation), kernel HWIO; = lax.conv_general_dilated."""
    k, _, cin, cout = w.shape
    wm = w.reshape(k * k * cin, cout)

    def chunk(_, xs):
        return None, _matmul(_im2col(xs[0], k), wm)

    return _chunked(chunk, None, (x,), _patch_bytes(x, k))[1]


def _conv2d_fwd(x, w):
    return conv2d(x, w), (x, w)


def _conv2d_bwd(res, dy):
    x, w = res
    k, _, cin, cout = w.shape
    wm = w.reshape(k * k * cin, cout)

    def chunk(dw, xs):
        xc, dyc = xs
        return dw + _gram(_im2col(xc, k), dyc), _col2im(_matmul(dyc, wm.T), k, x.shape[1], x.shape[2])

    dw, dx = _chunked(chunk, jnp.zeros_like(wm), (x, dy), _patch_bytes(x, k))
    return dx, dw.reshape(w.shape)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@jax.custom_vjp
def conv_transpose2d(x: Float[Array, "N H W Cin"], w: Float[Array, "Cin k k Cout"]
                     ) -> Float[Array, "N Ho Wo Cout"]:
    """Stride-2 VALID transposed convolution: y[2i + a, 2j + b] += x[i, j] @ w[:, a, b], Ho = 2(H - 1) + k.

    The kernel is stored (Cin, k, k, Cout) (PyTorch's ConvTranspose2d layout, channels last), which
    is the (Cin, k*k*Cout) matrix of the product as it is. It acts as in PyTorch and in TensorFlow's
    conv2d_transpose (the gradient of a convolution); in `lax.conv_transpose` terms (kernel HWIO,
    transpose_kernel=False) it is w.transpose(1, 2, 0, 3) flipped in space.
    """
    cin, k, _, cout = w.shape
    _, h, wd, _ = x.shape
    wm = w.reshape(cin, k * k * cout)

    def chunk(_, xs):
        return None, _col2im(_matmul(xs[0], wm), k, STRIDE * (h - 1) + k, STRIDE * (wd - 1) + k)

    return _chunked(chunk, None, (x,), 4 * h * wd * k * k * cout)[1]


def _conv_transpose2d_fwd(x, w):
    return conv_transpose2d(x, w), (x, w)


def _conv_transpose2d_bwd(res, dy):
    x, w = res
    cin, k, _, cout = w.shape
    wm = w.reshape(cin, k * k * cout)

    def chunk(dw, xs):
        xc, dyc = xs
        patches = _im2col(dyc, k)  # (n, H, W, k*k*Cout): the window of dy that each input pixel reached
        return dw + _gram(xc, patches), _matmul(patches, wm.T)

    dw, dx = _chunked(chunk, jnp.zeros_like(wm), (x, dy), _patch_bytes(dy, k))
    return dx, dw.reshape(w.shape)


conv_transpose2d.defvjp(_conv_transpose2d_fwd, _conv_transpose2d_bwd)


# ---- layers ---------------------------------------------------------------------------------------

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
    """Stride-2 VALID convolution + bias; (..., H, W, Cin) -> (..., Ho, Wo, Cout), Ho = (H - k) // 2 + 1."""
    weight: Float[Array, "k k Cin Cout"]
    bias: Float[Array, " Cout"]

    def __init__(self, key: jax.Array, cin: int, cout: int, k: int):
        wkey, bkey = jax.random.split(key)
        self.weight = _uniform(wkey, (k, k, cin, cout), k * k * cin)
        self.bias = _uniform(bkey, (cout,), k * k * cin)

    def __call__(self, x: Float[Array, "... H W Cin"]) -> Float[Array, "... Ho Wo Cout"]:
        return _batched(lambda x: conv2d(x, self.weight), x, 3) + self.bias


class ConvTranspose2d(eqx.Module):
    """Stride-2 VALID transposed convolution + bias; (..., H, W, Cin) -> (..., 2(H-1)+k, 2(W-1)+k, Cout)."""
    weight: Float[Array, "Cin k k Cout"]
    bias: Float[Array, " Cout"]

    def __init__(self, key: jax.Array, cin: int, cout: int, k: int):
        wkey, bkey = jax.random.split(key)
        self.weight = _uniform(wkey, (cin, k, k, cout), k * k * cin)
        self.bias = _uniform(bkey, (cout,), k * k * cin)

    def __call__(self, x: Float[Array, "... H W Cin"]) -> Float[Array, "... Ho Wo Cout"]:
        return _batched(lambda x: conv_transpose2d(x, self.weight), x, 3) + self.bias


class Linear(eqx.Module):
    """x @ W + b with W stored (in, out), so a batch is one matrix product; (..., in) -> (..., out)."""
    weight: Float[Array, "fan_in fan_out"]
    bias: Float[Array, " fan_out"]

    def __init__(self, key: jax.Array, fan_in: int, fan_out: int):
        wkey, bkey = jax.random.split(key)
        self.weight = _uniform(wkey, (fan_in, fan_out), fan_in)
        self.bias = _uniform(bkey, (fan_out,), fan_in)

    def __call__(self, x: Float[Array, "... fan_in"]) -> Float[Array, "... fan_out"]:
        return _matmul(x, self.weight) + self.bias


# ---- the VAE --------------------------------------------------------------------------------------

ENCODER = ((3, 32), (32, 64), (64, 128), (128, 256))           # (in, out) channels, 4x4 kernels
DECODER = ((1024, 128, 5), (128, 64, 5), (64, 32, 6), (32, 3, 6))  # (in, out) channels, kernel


class ConvVAE(eqx.Module):
    """The paper's ConvVAE; every method takes one frame / latent or a batch (leading axes)."""
    encoder: tuple[Conv2d, ...]
    mu: Linear
    logvar: Linear
    decoder_in: Linear
    decoder: tuple[ConvTranspose2d, ...]
    z_dim: int = eqx.field(static=True)

    def __init__(self, key: jax.Array, z_dim: int = 32):
        keys = jax.random.split(key, len(ENCODER) + len(DECODER) + 3)
        self.z_dim = z_dim
        self.encoder = tuple(Conv2d(kk, cin, cout, 4) for kk, (cin, cout) in zip(keys, ENCODER))
        self.mu = Linear(keys[4], 1024, z_dim)
        self.logvar = Linear(keys[5], 1024, z_dim)
        self.decoder_in = Linear(keys[6], z_dim, 1024)
        self.decoder = tuple(ConvTranspose2d(kk, cin, cout, k) for kk, (cin, cout, k) in zip(keys[7:], DECODER))

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
        raise ValueError(f"train_vae: collection folder {data_dir} holds no episodes")
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
