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


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an RGB image as PNG bytes (for ipywidgets.Image and files)."""
    import cv2

    ok, buf = cv2.imencode(".png", to_uint8(image)[..., ::-1])
    if not ok:
        raise ValueError("could not encode the image as PNG")
    return buf.tobytes()
