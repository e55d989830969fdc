"""viz: pure image functions on hand-made arrays."""

import cv2
import numpy as np
import pytest

from wmlib import viz


def test_to_uint8_rounds_and_clips():
    im = np.array([[[0.0, 0.5, 1.2]]], np.float32)
    assert viz.to_uint8(im).tolist() == [[[0, 128, 255]]]


def test_hstack_vstack_and_filmstrip_layout():
    a = np.zeros((4, 5, 3), np.uint8)
    b = np.full((4, 6, 3), 7, np.uint8)
    s = viz.hstack([a, b], pad=2)
    assert s.shape == (4, 13, 3)
    assert (s[:, 5:7] == 255).all() and (s[:, 7:] == 7).all()
    assert viz.vstack([a, a], pad=1).shape == (9, 5, 3)
    with pytest.raises(ValueError, match="equal height"):
        viz.hstack([a, np.zeros((3, 5, 3), np.uint8)])
    frames = (np.arange(10)[:, None, None, None] * np.ones((10, 2, 2, 3))).astype(np.uint8)
    strip = viz.filmstrip(frames, n=4)
    assert strip.shape == (2, 4 * 2 + 3 * 2, 3)
    assert [strip[0, i, 0] for i in (0, 4, 8, 12)] == [0, 3, 6, 9]  # evenly spaced, ends included


def test_png_round_trip():
    im = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    back = cv2.imdecode(np.frombuffer(viz.png_bytes(im), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(back, im)
    assert viz.upscale(im, 3).shape == (24, 27, 3)
