"""Atomic file writes and run directories.

Every file the project writes goes through `atomic_write`: the bytes land in a temporary file in the
same folder, which is renamed over the target only when complete. A run killed midway leaves either
the old file or the new one, never a half-written file that a reader would accept.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator


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
