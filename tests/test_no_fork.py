"""No fork in a multithreaded JAX process: videos (and the workers) start without `os.fork()` warnings.

JAX warns ("os.fork() was called ... will likely lead to a deadlock") from a fork hook that Python runs
whenever it really forks, e.g. for a subprocess with `preexec_fn` (imageio-ffmpeg's writer uses one).
"""

import os
import subprocess
import sys
import warnings

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmlib.config import PRETRAINED_DIR
from wmlib.files import write_mp4

FORK_WARNING = "os.fork() was called"


def _fork_warnings(f):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f()
    return [str(w.message) for w in caught if FORK_WARNING in str(w.message)]


def test_write_mp4_does_not_fork_in_a_jax_process(tmp_path):
    jnp.zeros(3).block_until_ready()  # JAX's backend is up (and its fork hook installed)
    assert jax.devices()
    # the detector works: a subprocess that really forks (as imageio-ffmpeg's writer does) warns
    assert _fork_warnings(lambda: subprocess.run(["true"], preexec_fn=os.setpgrp, check=True))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(7)]
    path = tmp_path / "clip.mp4"
    assert _fork_warnings(lambda: write_mp4(path, frames, fps=10)) == []
    video = cv2.VideoCapture(str(path))  # (imageio-ffmpeg's reader would fork, and warn, itself)
    read = []
    while (got := video.read())[0]:
        read.append(got[1])
    video.release()
    assert len(read) == 7 and read[0].shape == (48, 64, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary file left behind


def test_write_mp4_refuses_float_frames(tmp_path):
    try:
        write_mp4(tmp_path / "x.mp4", [np.zeros((8, 8, 3), np.float32)])
    except ValueError as e:
        assert "expected uint8 frames of shape (H, W, 3)" in str(e) and "x.mp4" in str(e)
    else:
        raise AssertionError("float frames were accepted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # starts `wm` in a subprocess, as test_cli.py's tests do
def test_wm_evaluate_video_prints_no_fork_warning(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wmlib.cli", "evaluate", "--agent", str(PRETRAINED_DIR),
                           "--episodes", "1", "--max-steps", "20", "--workers", "1", "--video", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "WM_PRESET": "smoke"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert FORK_WARNING not in proc.stderr and "fork" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert len(list(tmp_path.glob("*.mp4"))) == 1
