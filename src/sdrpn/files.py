"""Atomic writes: a crash or Ctrl-C never leaves a half-written label shard, checkpoint or result.

`atomic_write` writes into a temporary file ``.{name}.{suffix}`` beside the target (suffix: 8 random
characters) and renames it into place. Only a killed process leaves one behind;
`clean_stale_temporaries` removes those.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from sdrpn.errors import SdrpnError

# O_EXCL: never reuse an existing file; O_BINARY matters on Windows only; O_CLOEXEC keeps it from child processes.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
_SUFFIX = re.compile(r"[A-Za-z0-9_]+")  # the random part of a temporary's name (ours: hex; mkstemp's: [a-z0-9_])


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new, empty file ``.{name}.{random}`` beside `path`, open for writing: (descriptor, its path).

    Created with mode 0o666 like open() does, so the kernel applies the umask (and any default ACL) at
    creation: the process-wide umask is never read or changed."""
    for _ in range(100):
        temporary = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(4)}")
        try:
            return os.open(temporary, _CREATE_FLAGS, 0o666), temporary
        except FileExistsError:
            continue
    raise SdrpnError(f"cannot create a temporary file beside {path}: 100 random names were taken")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write through `write(file)` into a temporary file beside `path`, then rename it into place.

    The file gets the mode open() would give it (0o666 minus the umask), without touching the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = _create_temporary(path)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temporary, path)
    finally:
        try:
            os.unlink(temporary)  # only still there if writing or renaming failed
        except FileNotFoundError:
            pass
    return path


def atomic_write_json(path: str | Path, payload: object) -> Path:
    return atomic_write(path, lambda file: file.write(json.dumps(payload, indent=2).encode()))


def clean_stale_temporaries(
    directory: str | Path, patterns: str | Iterable[str], *, min_age: float = 60.0
) -> list[Path]:
    """Delete the temporaries a killed `atomic_write` left in `directory` (not in its subdirectories).

    A file is deleted when all hold:
    - its name is ``.{name}.{suffix}``, `suffix` being letters, digits and '_' (no dot) and `name` matching
      one of `patterns` (exact target names such as ``"rpn_model.safetensors"`` or glob patterns such as
      ``"shard-*.pt"``, matched case-sensitively), e.g. ``.shard-00001.pt.3f9a0c1d``;
    - it is a regular file (not a directory or symlink);
    - it was last modified more than `min_age` seconds ago, so a write in progress (by another process
      writing beside it) is left alone.
    Patterns should name only files that are written with `atomic_write`: ``"*"`` would also match e.g. a
    user's ``.notes.txt.bak``. Files that vanish or cannot be removed meanwhile are skipped. A missing
    directory has nothing to clean. Returns the deleted paths, sorted.
    """
    try:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    except TypeError:
        raise SdrpnError(f"patterns must be a file name, a glob or a list of them, got {patterns!r}") from None
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern or "/" in pattern or os.sep in pattern:
            raise SdrpnError(f"temporary-file patterns must be non-empty file names or globs, got {pattern!r}")
    if not isinstance(min_age, (int, float)) or isinstance(min_age, bool) or not min_age >= 0:
        raise SdrpnError(f"min_age must be a number of seconds >= 0, got {min_age!r}")
    directory = Path(directory)
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    cutoff = time.time() - min_age
    removed = []
    for entry in entries:
        if not _is_temporary_of(entry.name, patterns):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or info.st_mtime > cutoff:
                continue
            os.unlink(entry.path)
        except OSError:  # gone already (another cleaner), or not ours to remove
            continue
        removed.append(directory / entry.name)
    return sorted(removed)


def _is_temporary_of(filename: str, patterns: list[str]) -> bool:
    """Whether `filename` is ``.{name}.{suffix}`` with `name` matching a pattern (see clean_stale_temporaries)."""
    if not filename.startswith("."):
        return False
    name, dot, suffix = filename[1:].rpartition(".")
    if not (dot and name and _SUFFIX.fullmatch(suffix)):
        return False
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
