"""One atomic-write primitive: the new file appears whole or not at all, and no temporary file stays behind."""

from __future__ import annotations

import json
import stat

import pytest

from vpt_lightning.runs.atomic import atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic


def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "report.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp != target
            tmp.write_bytes(b"half a fi")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]


def test_failing_writer_never_creates_the_file(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"\x89PNG")
            (tmp_path / "missing" / "x").write_bytes(b"")  # a writer that fails after starting
    assert list(tmp_path.iterdir()) == []


def test_writers_replace_the_file_readable_by_all(tmp_path):
    target = tmp_path / "a" / "b.txt"
    write_text_atomic("one", target)
    write_text_atomic("two", target)
    assert target.read_text() == "two" and stat.S_IMODE(target.stat().st_mode) == 0o644
    write_bytes_atomic(b"\x00\x01", tmp_path / "c.bin")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    write_json_atomic({"b": 1, "a": [2]}, tmp_path / "d.json")
    assert json.loads((tmp_path / "d.json").read_text()) == {"a": [2], "b": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c.bin", "d.json"]


def test_writes_are_fsynced_file_first_then_the_folder_after_the_rename(tmp_path, monkeypatch):
    import os

    from vpt_lightning import atomic

    target, synced = tmp_path / "results.json", []
    real_fsync = os.fsync

    def recording_fsync(fd):
        info = os.fstat(fd)
        synced.append((stat.S_ISDIR(info.st_mode), info.st_ino, target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", recording_fsync)
    write_json_atomic({"val/top1": 0.5}, target)
    # the temporary file (the inode that becomes the target) before the rename, then the folder after it
    assert synced == [(False, target.stat().st_ino, False), (True, tmp_path.stat().st_ino, True)]


@pytest.mark.parametrize("umask, expected", [(0o077, 0o600), (0o002, 0o664), (0o022, 0o644)])
def test_new_files_get_the_mode_the_umask_allows(tmp_path, umask, expected):
    import os

    old = os.umask(umask)
    try:
        write_text_atomic("x", tmp_path / "a.txt")
        with open(tmp_path / "plain.txt", "w") as f:  # what any other writer of the process would create
            f.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == expected


def test_stale_temp_files_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    from vpt_lightning.runs.atomic import remove_stale_temp_files

    # what a kill between mkstemp and the rename leaves, in the names atomic_path gives
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "checkpoints" / "last.ckpt") as tmp:
            stale = tmp
            tmp.write_bytes(b"half")
            survivor = tmp.with_name(tmp.name + ".kept")  # outlives the clean-up atomic_path does on errors
            survivor.hardlink_to(tmp)
            raise KeyboardInterrupt  # stands for the kill
    survivor.rename(stale)
    stale_json = tmp_path / ".results.ab_3xYz9.tmp.json"
    stale_json.write_text("{")
    keep = [
        tmp_path / "results.json",
        tmp_path / ".hydra" / "config.yaml",
        tmp_path / ".lock",
        tmp_path / ".notes.tmp",
        tmp_path / "data.tmp.json",
    ]
    for path in keep:
        path.parent.mkdir(exist_ok=True)
        path.write_text("keep")
    deeper = tmp_path / "a" / "b" / ".x.abcdefgh.tmp"  # below the depth asked for: not this folder's writes
    deeper.parent.mkdir(parents=True)
    deeper.write_text("keep")
    removed = remove_stale_temp_files(tmp_path, depth=1)
    assert sorted(removed) == sorted([stale, stale_json]) and not stale.exists() and not stale_json.exists()
    assert all(p.read_text() == "keep" for p in [*keep, deeper])
