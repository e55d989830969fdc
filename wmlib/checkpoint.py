"""Checkpoints: one JSON header line, then `eqx.tree_serialise_leaves` of the module.

The header says what the file holds (`kind`: "vae", "mdnrnn", "controller", ...), the
hyperparameters needed to rebuild the module's skeleton, the checkpoint format and the package
version. Loading a file of the wrong kind or format fails with a message naming the file.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import equinox as eqx

from wmlib import __version__
from wmlib.files import atomic_write
from wmlib.errors import WMError

FORMAT = 1
ModuleT = TypeVar("ModuleT")  # a module, or a pytree of modules and arrays (a training state)
MAGIC = "wmlib-checkpoint"


class CheckpointError(WMError):
    """A checkpoint file is missing, foreign, of the wrong kind, or from an incompatible version."""


def save(path: str | os.PathLike, module: Any, kind: str, hyper: dict, extra: dict | None = None) -> Path:
    """Atomically write `module` with a JSON header. `hyper` rebuilds the skeleton; `extra` is free."""
    header = {"magic": MAGIC, "format": FORMAT, "version": __version__, "kind": kind,
              "hyper": hyper, "extra": extra or {}}
    path = Path(path)
    with atomic_write(path) as f:
        f.write((json.dumps(header, sort_keys=True) + "\n").encode())
        eqx.tree_serialise_leaves(f, module)
    return path


def read_header(path: str | os.PathLike) -> dict:
    """Read and validate the header of a checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        line = f.readline(1 << 20)
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise CheckpointError(f"{path} is not a wmlib checkpoint (no wmlib JSON header on its first line)")
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {header.get('format')} (written by wmlib {header.get('version')}); "
            f"this wmlib {__version__} reads format {FORMAT}")
    return header


def load(path: str | os.PathLike, kind: str, build: Callable[[dict], ModuleT]) -> tuple[ModuleT, dict]:
    """Load a checkpoint of `kind`; `build(hyper)` makes a module of the right structure to fill."""
    header = read_header(path)
    if header["kind"] != kind:
        raise CheckpointError(f"{path} holds a {header['kind']} checkpoint, expected a {kind}")
    skeleton = eqx.filter_eval_shape(build, header["hyper"])  # shapes only: no weights computed
    with open(path, "rb") as f:
        f.readline(1 << 20)
        data = f.read()
    try:
        module = eqx.tree_deserialise_leaves(io.BytesIO(data), skeleton)
    except Exception as e:  # truncated file or mismatched structure
        raise CheckpointError(f"{path}: cannot read the {kind} weights ({type(e).__name__}: {e})") from None
    return module, header

