"""One atomic-write primitive: the new file appears whole or not at all, and no temporary file stays behind."""

from __future__ import annotations

import json
import stat

import pytest

from vpt_lightning.atomic import atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic


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
