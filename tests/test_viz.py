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


def test_recon_panel_shows_error_where_they_differ():
    frame = np.zeros((64, 64, 3), np.uint8)
    recon = frame.copy()
    recon[10:20, 30:40] = 200
    panel = viz.recon_panel(frame, recon, scale=1)
    assert panel.shape == (64, 64 * 3 + 8, 3)
    err = panel[:, 64 * 2 + 8:]
    assert (err[10:20, 30:40] == 255).all() and err[:10].max() == 0  # bright exactly where they differ


def test_latent_sweep_sets_one_dimension_per_row():
    seen = []

    def decode(zs):
        seen.append(np.array(zs))
        return np.zeros((len(zs), 4, 4, 3), np.float32)

    grid = viz.latent_sweep(decode, np.full(3, 0.5), dims=[2, 0], values=np.array([-1.0, 1.0]))
    zs = seen[0]
    np.testing.assert_array_equal(zs, [[0.5, 0.5, -1], [0.5, 0.5, 1], [-1, 0.5, 0.5], [1, 0.5, 0.5]])
    assert grid.shape == (4 * 2 + 2, 4 * 2 + 2, 3)


def test_kl_per_dim_matches_closed_form():
    mu = np.array([[0.0, 1.0], [0.0, -1.0]])
    logvar = np.array([[0.0, np.log(4.0)], [0.0, np.log(4.0)]])
    # KL(N(m, s^2) || N(0, 1)) = (s^2 + m^2 - 1 - log s^2) / 2: dim 0 -> 0; dim 1 -> (4 + 1 - 1 - log 4) / 2
    np.testing.assert_allclose(viz.kl_per_dim(mu, logvar), [0.0, (4 - np.log(4)) / 2])


def red_pixels(image: np.ndarray) -> np.ndarray:
    """(N, 2) (row, column) of the pixels drawn in the marker's pure red."""
    r, g, b = (image[..., i].astype(int) for i in range(3))
    return np.argwhere((r > 200) & (g < 60) & (b < 60))


def test_line_strip_marker_moves_with_t_at_the_right_x():
    series = {"a": np.linspace(0, 1, 21), "b": np.zeros(21)}
    cols = []
    for t in (1, 11, 21):  # x runs from start=1: the first, middle and last point
        image = viz.line_strip(series, t, xlabel="generation", start=1)
        red = red_pixels(image)
        assert len(red) > 50  # a vertical line, not a stray pixel
        cols.append(red[:, 1].mean())
    assert cols[0] < cols[1] < cols[2]
    assert abs((cols[1] - cols[0]) - (cols[2] - cols[1])) < 2  # evenly spaced: x is linear in t
    with pytest.raises(IndexError):
        viz.line_strip(series, 22, start=1)  # past the last point: no value to put in the title


def test_track_map_puts_the_dot_on_the_road_where_the_car_is():
    angles = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    track = 100 * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # a round track, centre (0, 0)
    car_xy = np.array([[100.0, 0.0], [0.0, 100.0], [0.0, -160.0]])  # east and north on the road; south, off it
    maps = [viz.track_map(track, car_xy, t, size=200) for t in range(3)]
    grey = np.argwhere((maps[0] == 170).all(axis=-1))
    centre = grey.mean(axis=0)  # the ring's centre, in pixels (row, column)
    ring = np.linalg.norm(grey - centre, axis=1).mean()  # its radius: 100 world units
    for image, (x, y) in zip(maps, car_xy):
        dot = red_pixels(image).mean(axis=0) - centre
        # north is up: a world y is minus a row; the dot sits at the car's distance and bearing
        np.testing.assert_allclose(dot, np.array([-y, x]) * ring / 100, atol=1.5)
