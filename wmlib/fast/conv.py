"""V's strided convolutions, fast on CPUs: im2col + one matrix product, gradients by hand.

`conv2d` and `conv_transpose2d` compute exactly what `wmlib.vae.conv2d` and
`wmlib.vae.conv_transpose2d` compute with `jax.lax` (tests/test_vae.py checks values and gradients),
several times faster for V's training step on a CPU. `vae.ConvVAE(fast=True)` (the default) uses
them, `fast=False` the lax reference.

Why. XLA's CPU backend computes the kernel gradient of a strided transposed convolution very slowly
(seconds per step here) and its strided convolutions are mediocre. So each layer is im2col + one
matrix product, and `jax.custom_vjp` gives its gradients as two more matrix products, so XLA cannot
build a slow backward pass of its own (W as a matrix):
    conv2d            y = im2col(x) W          dW = im2col(x)^T dy      dx = col2im(dy W^T)
    conv_transpose2d  y = col2im(x W)          dW = x^T im2col(dy)      dx = im2col(dy) W^T
(the transposed convolution is the adjoint of the convolution in x). `_im2col` is one gather (every
stride-2 window as a row), which XLA runs near memory speed, unlike a concatenation of k*k strided
slices; `_col2im`, its adjoint, adds the k*k taps back in space-to-depth layout, where each tap is a
shift by whole pixels (a zero pad that XLA fuses into one sum), then interleaves the stride phases
(depth-to-space). Each layer runs over the batch in chunks of a few examples (`_chunked`), which
keeps the im2col buffers in cache and lets XLA run the chunks concurrently on all cores. The `wm`
command also keeps freed memory in the process (`wmlib.fast.memory`), because XLA allocates its
scratch buffers afresh on every call and the kernel's zero-filling of new pages cost more than some
layers' arithmetic. bench/vae_speed.py times the training step against PyTorch.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

STRIDE = 2


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
