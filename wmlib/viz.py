"""Pure functions that turn arrays into pictures (uint8 images or matplotlib figures).

Nothing here holds state or talks to widgets; `wmlib.widgets` wires these to sliders, and the tests
call them directly on hand-made arrays.
"""

from __future__ import annotations

import numpy as np


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] (or already uint8) -> uint8 HxWx3."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def hstack(images: list[np.ndarray], pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Images of equal height side by side with `pad` white columns between them."""
    images = [to_uint8(im) for im in images]
    h = images[0].shape[0]
    if any(im.shape[0] != h for im in images):
        raise ValueError(f"hstack needs images of equal height, got {[im.shape for im in images]}")
    gap = np.full((h, pad, 3), pad_value, np.uint8)
    parts = []
    for i, im in enumerate(images):
        parts += [im] if i == 0 else [gap, im]
    return np.concatenate(parts, axis=1)


def vstack(images: list[np.ndarray], pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Images of equal width stacked vertically with `pad` white rows between them."""
    return np.swapaxes(hstack([np.swapaxes(to_uint8(im), 0, 1) for im in images], pad, pad_value), 0, 1)


def filmstrip(frames: np.ndarray, n: int = 8, start: int = 0, stop: int | None = None) -> np.ndarray:
    """`n` frames evenly spaced over frames[start:stop], side by side: (H, n*W + pads, 3) uint8."""
    frames = np.asarray(frames)
    stop = len(frames) if stop is None else stop
    idx = np.linspace(start, max(start, stop - 1), num=min(n, stop - start)).round().astype(int)
    return hstack([frames[i] for i in idx])


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, so 64x64 frames are readable on screen."""
    return np.repeat(np.repeat(to_uint8(image), factor, axis=0), factor, axis=1)


def panel_row(images: list[np.ndarray], scale: int = 3) -> np.ndarray:
    """Frames enlarged `scale` times, side by side."""
    return hstack([upscale(im, scale) for im in images], pad=4)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an RGB image as PNG bytes (for ipywidgets.Image and files)."""
    import cv2

    ok, buf = cv2.imencode(".png", to_uint8(image)[..., ::-1])
    if not ok:
        raise ValueError("could not encode the image as PNG")
    return buf.tobytes()


def agent_video_frame(raw: np.ndarray, recon: np.ndarray, dream: np.ndarray, height: int = 192) -> np.ndarray:
    """One video frame: the real observation | V's reconstruction | M's prediction, each `height` tall."""
    import cv2

    panels = [cv2.resize(to_uint8(im), (height, height), interpolation=cv2.INTER_NEAREST)
              for im in (raw, recon, dream)]
    return hstack(panels, pad=4)


def filmstrip_rows(rows: list[np.ndarray], start: int, stop: int, n: int = 9) -> np.ndarray:
    """Several aligned frame sequences (each (T, H, W, 3)) as stacked filmstrips over [start, stop)."""
    T = len(rows[0])
    start, stop = max(0, start), min(T, stop)
    return vstack([filmstrip(r, n=n, start=start, stop=stop) for r in rows], pad=4)


# ---- V: reconstructions and latent sweeps --------------------------------------------------------

def recon_panel(frame: np.ndarray, recon: np.ndarray, scale: int = 3) -> np.ndarray:
    """original | reconstruction | per-pixel absolute error (brighter = worse), enlarged `scale` times."""
    frame, recon = to_uint8(frame), to_uint8(recon)
    err = np.abs(frame.astype(np.int16) - recon.astype(np.int16)).mean(axis=-1)
    err = np.repeat((np.clip(err * 3, 0, 255)).astype(np.uint8)[..., None], 3, axis=-1)
    return hstack([upscale(frame, scale), upscale(recon, scale), upscale(err, scale)], pad=4)


def latent_sweep(decode, z: np.ndarray, dims: list[int], values: np.ndarray | None = None) -> np.ndarray:
    """A grid: row r decodes z with dimension dims[r] set to each of `values` (default -3, -2, ..., 3:
    V's prior spans +-3).

    `decode(zs (N, z_dim)) -> frames (N, 64, 64, 3)` in [0, 1] or uint8.
    """
    values = np.linspace(-3, 3, 7) if values is None else np.asarray(values)
    z = np.asarray(z, np.float32)
    zs = np.repeat(z[None], len(dims) * len(values), axis=0)
    for r, d in enumerate(dims):
        zs[r * len(values):(r + 1) * len(values), d] = values
    frames = np.asarray(decode(zs))
    rows = [hstack(list(frames[r * len(values):(r + 1) * len(values)])) for r in range(len(dims))]
    return vstack(rows)


def kl_per_dim(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """Mean KL(q(z|x) || N(0, 1)) of each latent dimension over frames: (N, z) -> (z,).

    Dimensions with KL near 0 carry no information (posterior = prior); V uses the others.
    """
    return np.mean(0.5 * (np.exp(logvar) + mu**2 - 1.0 - logvar), axis=0)


# ---- M: dreams beside reality --------------------------------------------------------------------

def fig_to_array(fig) -> np.ndarray:
    """Render a matplotlib figure to an RGB uint8 array (and close it)."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


MARKER = (1.0, 0.0, 0.0)  # pure red: the "you are here" marker of the strips and the map


def line_strip(series: dict[str, np.ndarray], t: int, xlabel: str = "step", start: int = 0,
               width: float = 6.0) -> np.ndarray:
    """Curves over x = start, start+1, ... with a red marker at x = t and every curve's value there in
    the title (RGB array): rewards along an episode, C's actions, returns over generations."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(width, 1.9), dpi=80)
    for label, values in series.items():
        ax.plot(np.arange(start, start + len(values)), values, lw=1, label=label)
    ax.axvline(t, color=MARKER, lw=1.5, zorder=3)  # above the frame, so it shows at either end too
    n = max(len(v) for v in series.values())
    ax.set_xlim(start, start + max(n - 1, 1))
    ax.set_title(f"{xlabel} {t}: " + ", ".join(f"{k} {v[t - start]:.2f}" for k, v in series.items()), fontsize=8)
    ax.set_xlabel(xlabel, fontsize=7, labelpad=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="upper right")
    ax.tick_params(labelsize=7)
    fig.tight_layout(pad=0.3)
    return fig_to_array(fig)


def track_map(track: np.ndarray, car_xy: np.ndarray, t: int, size: int = 192, margin: int = 6) -> np.ndarray:
    """A map, north up: the road (grey, `env.TRACK_HALF_WIDTH` either side of the centre line `track`
    (N, 2), world units), the car's path up to step t (blue) and a red dot where the car is at step t
    (`car_xy` (T, 2), as episodes record it in `info["car_xy"]`). (size, size, 3) uint8."""
    import cv2

    from wmlib.env import TRACK_HALF_WIDTH

    track, car_xy = np.asarray(track, np.float64), np.asarray(car_xy, np.float64)
    points = np.vstack([track, car_xy])
    lo, hi = points.min(0) - TRACK_HALF_WIDTH, points.max(0) + TRACK_HALF_WIDTH
    scale = (size - 2 * margin) / max(hi - lo)
    offset = (size - (hi - lo) * scale) / 2  # centred in both directions

    def pixels(xy):  # world (x, y) -> integer (column, row), rows growing downwards
        col = offset[0] + (xy[:, 0] - lo[0]) * scale
        row = size - (offset[1] + (xy[:, 1] - lo[1]) * scale)
        return np.round(np.stack([col, row], axis=-1)).astype(np.int32)

    image = np.full((size, size, 3), 255, np.uint8)
    cv2.polylines(image, [pixels(track)], True, (170, 170, 170), max(1, round(2 * TRACK_HALF_WIDTH * scale)),
                  cv2.LINE_AA)
    cv2.polylines(image, [pixels(car_xy[:t + 1])], False, (40, 90, 200), 1, cv2.LINE_AA)
    cv2.circle(image, tuple(int(v) for v in pixels(car_xy[t:t + 1])[0]), 4, tuple(255 * c for c in MARKER), -1)
    return image


def mdn_samples(x: np.ndarray, y: np.ndarray, xs: np.ndarray, ys: np.ndarray, title: str = "") -> np.ndarray:
    """Data points (x, y) and a model's samples ys at inputs xs, one scatter plot (RGB array): the
    1-D mixture density toy of lesson 03."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=80)
    ax.scatter(x, y, s=2, alpha=0.3, label="data")
    ax.scatter(xs, ys, s=2, alpha=0.3, label="samples from the model")
    ax.set_ylim(np.min(y) - 0.5, np.max(y) + 0.5)  # fixed, so that pictures at several tau compare
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig_to_array(fig)


def real_vs_dream(mdnrnn, decode, mu: np.ndarray, actions: np.ndarray, start: int, steps: int,
                  key, tau: float = 1.0) -> dict[str, np.ndarray]:
    """From real frame `start` of an encoded episode, let M dream `steps` steps with the REAL actions.

    Returns the dream's decoded frames (steps+1, 64, 64, 3) uint8 and M's predicted rewards (steps,),
    to put beside the real frames and rewards of the same stretch.
    """
    import jax.numpy as jnp

    from wmlib.controller import Controller
    from wmlib.dream import drive, start_from_frame

    steps = min(steps, len(actions) - start)
    state = start_from_frame(mdnrnn, jnp.asarray(mu), jnp.asarray(actions), start)
    out = drive(key, state, mdnrnn, jnp.asarray(tau, jnp.float32), jnp.asarray(actions[start:start + steps]),
                jnp.zeros(steps, bool), Controller(mdnrnn.z_dim, mdnrnn.hidden))
    return {"frames": to_uint8(np.asarray(decode(out.z))), "reward": np.asarray(out.reward),
            "done_prob": np.asarray(out.done_prob)}
