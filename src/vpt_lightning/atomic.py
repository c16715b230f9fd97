"""Atomic file writes: a temporary file in the same folder, then a rename, so readers never see half a file."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on an exception it is removed.

    The temporary name keeps ``path``'s suffix (writers such as matplotlib pick the format from it). The folder
    is created; the file gets ``mode`` (``mkstemp`` would leave it private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` atomically (creating the folder)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` atomically (creating the folder)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(data: Any, path: Path) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text_atomic(json.dumps(data, indent=2, sort_keys=True) + "\n", path)
