"""Pins sdrpn.files: atomic writes get open()'s mode without touching the umask; stale temporaries are cleaned."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

from sdrpn.errors import SdrpnError
from sdrpn.files import atomic_write, atomic_write_json, clean_stale_temporaries

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes and umask")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _umask_from_proc() -> int | None:
    """The umask read without changing it (Linux >= 4.7), or None where /proc does not tell."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return None


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


@posix_only
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002, 0o000])
def test_written_file_has_the_mode_open_would_give(tmp_path, mask):
    old = os.umask(mask)
    try:
        with open(tmp_path / "plain.bin", "wb") as file:
            file.write(b"x")
        atomic_write(tmp_path / "atomic.bin", lambda file: file.write(b"x"))
        atomic_write_json(tmp_path / "atomic.json", {"a": 1})
    finally:
        os.umask(old)
    expected = _mode(tmp_path / "plain.bin")
    assert expected == 0o666 & ~mask
    assert _mode(tmp_path / "atomic.bin") == expected
    assert _mode(tmp_path / "atomic.json") == expected


@posix_only
def test_atomic_write_never_calls_umask(tmp_path, monkeypatch, umask_027):
    def forbidden(mask):
        raise AssertionError("atomic_write changed the process-wide umask")

    monkeypatch.setattr(os, "umask", forbidden)
    seen = []

    def write(file):
        seen.append(_umask_from_proc())  # the umask as other threads see it while we write
        file.write(b"data")

    atomic_write(tmp_path / "out.bin", write)
    atomic_write_json(tmp_path / "out.json", [1, 2])
    monkeypatch.undo()
    if seen[0] is not None:
        assert seen == [umask_027]
    assert _mode(tmp_path / "out.bin") == 0o640 and _mode(tmp_path / "out.json") == 0o640


@posix_only
def test_files_of_other_threads_never_become_world_writable(tmp_path, umask_027):
    """The old atomic_write set the umask to 0 for a moment: another thread's new file could get 0o666."""
    stop = threading.Event()
    modes = []

    def other_thread():
        index = 0
        while not stop.is_set():
            path = tmp_path / f"other-{index}"
            with open(path, "wb"):
                pass
            modes.append(_mode(path))
            index += 1

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        for index in range(300):
            atomic_write(tmp_path / f"atomic-{index % 5}.bin", lambda file: file.write(b"x"))
    finally:
        stop.set()
        thread.join()
    assert modes and set(modes) == {0o640}


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "result.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "shard-00001.pt"
    target.write_bytes(b"old")

    def broken(file):
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00001.pt"]


def test_temporaries_are_named_for_the_cleaner(tmp_path):
    names = []
    atomic_write(tmp_path / "rpn_model.safetensors", lambda file: names.extend(os.listdir(tmp_path)))
    (name,) = names
    assert name.startswith(".rpn_model.safetensors.")
    os.utime(tmp_path / "rpn_model.safetensors", (0, 0))
    # what a killed writer leaves behind is what the cleaner removes
    (tmp_path / name).write_bytes(b"half")
    os.utime(tmp_path / name, (0, 0))
    assert clean_stale_temporaries(tmp_path, "rpn_model.safetensors") == [tmp_path / name]


# --- clean_stale_temporaries -------------------------------------------------------------------


def _touch(path: Path, age: float = 3600.0) -> Path:
    path.write_bytes(b"x")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_clean_removes_old_temporaries_of_the_given_targets_only(tmp_path):
    stale = [
        _touch(tmp_path / ".shard-00001.pt.abc123"),
        _touch(tmp_path / ".shard-00002.pt.x_9Z"),
        _touch(tmp_path / ".rpn_model.safetensors.xyz"),
        _touch(tmp_path / ".rpn_config.json.3f9a0c1d"),
    ]
    kept = [
        _touch(tmp_path / "shard-00001.pt"),  # the targets themselves
        _touch(tmp_path / "rpn_model.safetensors"),
        _touch(tmp_path / ".shard-00003.pt.new", age=0.0),  # a write in progress
        _touch(tmp_path / ".other.bin.abc123"),  # not a target we were told about
        _touch(tmp_path / ".shard-00001.pt"),  # no suffix
        _touch(tmp_path / ".shard-00001.pt."),  # empty suffix
        _touch(tmp_path / ".shard-00001.pt.a-b"),  # not a random suffix
        _touch(tmp_path / "shard-00001.pt.abc123"),  # not hidden
        _touch(tmp_path / "..pt.abc"),  # empty name
    ]
    (tmp_path / ".shard-00004.pt.dir").mkdir()  # not a file
    (tmp_path / "nested").mkdir()
    kept.append(_touch(tmp_path / "nested" / ".shard-00005.pt.abc"))  # not recursive
    removed = clean_stale_temporaries(tmp_path, ["shard-*.pt", "rpn_model.safetensors", "rpn_config.json"])
    assert removed == sorted(stale)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    assert (tmp_path / ".shard-00004.pt.dir").is_dir()
    assert clean_stale_temporaries(tmp_path, ["shard-*.pt"]) == []  # idempotent


def test_clean_min_age(tmp_path):
    recent = _touch(tmp_path / ".progress.json.abc", age=30.0)
    assert clean_stale_temporaries(tmp_path, "progress.json") == []  # default: older than 60 s
    assert clean_stale_temporaries(tmp_path, "progress.json", min_age=10) == [recent]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="symlinks")
def test_clean_leaves_symlinks_and_their_targets(tmp_path):
    target = _touch(tmp_path / "precious.bin")
    link = tmp_path / ".shard-00001.pt.abc"
    try:
        link.symlink_to(target)
    except OSError:
        pytest.skip("cannot create symlinks here")
    assert clean_stale_temporaries(tmp_path, "shard-*.pt", min_age=0) == []
    assert link.is_symlink() and target.exists()


def test_clean_a_missing_directory_is_a_no_op(tmp_path):
    assert clean_stale_temporaries(tmp_path / "missing", ["*.pt"]) == []
    _touch(tmp_path / "file")
    assert clean_stale_temporaries(tmp_path / "file", ["*.pt"]) == []


@pytest.mark.parametrize("patterns", [["sub/x.pt"], [""], [None], None, 3, [3]])
def test_clean_rejects_bad_patterns(tmp_path, patterns):
    with pytest.raises(SdrpnError):
        clean_stale_temporaries(tmp_path, patterns)


@pytest.mark.parametrize("min_age", [-1.0, float("nan"), "60", None, True])
def test_clean_rejects_bad_min_age(tmp_path, min_age):
    with pytest.raises(SdrpnError, match="min_age"):
        clean_stale_temporaries(tmp_path, ["*.pt"], min_age=min_age)
