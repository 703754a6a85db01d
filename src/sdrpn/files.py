"""Atomic writes: a crash or Ctrl-C never leaves a half-written label shard, checkpoint or result."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write through `write(file)` into a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600 files; give what open() would
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def atomic_write_json(path: str | Path, payload: object) -> Path:
    return atomic_write(path, lambda file: file.write(json.dumps(payload, indent=2).encode()))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
