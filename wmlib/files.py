"""Atomic file writes and run directories.

Every file the project writes goes through `atomic_write`: the bytes land in a temporary file in the
same folder, which is renamed over the target only when complete. A run killed midway leaves either
the old file or the new one, never a half-written file that a reader would accept.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import tempfile
from pathlib import Path
from collections.abc import Iterable, Iterator

import numpy as np


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path`; rename it to `path` on success, delete it on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line to a metrics log (appends are line-atomic for small records)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a metrics log; a torn last line (killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def write_mp4(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: int = 50) -> Path:
    """Write uint8 RGB frames (each HxWx3, all one size) as an H.264 mp4 that browsers play, atomically.

    ffmpeg (imageio-ffmpeg's binary) is started without `preexec_fn`, so Python starts it with
    vfork/posix_spawn and runs no fork hooks: no "os.fork() was called" warning from JAX, no
    deadlock risk in a multithreaded process. It runs in its own process group, so a Ctrl+C meant for
    Python does not cut the file short under it (the temporary file is removed instead).
    """
    import imageio_ffmpeg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = iter(frames)
    first = np.asarray(next(frames))
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] != 3:
        raise ValueError(f"write_mp4({path}): expected uint8 frames of shape (H, W, 3), got {first.dtype} "
                         f"{first.shape}")
    h, w = first.shape[:2]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".mp4")
    os.close(fd)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-",
           "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "25", tmp]  # crf 25: imageio's quality 5
    # stderr is inherited, as imageio-ffmpeg does: at this log level ffmpeg prints only its errors
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, process_group=0)
    stdin = proc.stdin
    assert stdin is not None
    try:
        try:
            for frame in itertools.chain([first], frames):
                frame = np.asarray(frame)
                if frame.shape != first.shape or frame.dtype != np.uint8:
                    raise ValueError(f"write_mp4({path}): frame of {frame.dtype} {frame.shape} among "
                                     f"uint8 {first.shape} frames")
                stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:
            pass  # ffmpeg stopped early; its exit status and message say why
        stdin.close()
        if proc.wait() != 0:
            raise RuntimeError(f"write_mp4({path}): ffmpeg failed with exit status {proc.returncode} "
                               "(its message is above)")
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def ensure_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` as a folder, or fail with one clear line if that is impossible."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is a file; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create {what} {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{what} {path} is not writable")
    return path
