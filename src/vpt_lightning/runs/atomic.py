"""Atomic, durable file writes: a temporary file in the same folder, synced to disk, then renamed over the target.

Readers never see half a file, and a power cut after the rename never leaves an empty one: the temporary file is
fsynced before the rename and the folder after it. New files get the permissions the process's umask allows (as
``open`` would give them), not ``mkstemp``'s private 0600. A run killed between creating and renaming its temporary
file leaves it behind; :func:`remove_stale_temp_files` clears such leftovers when the next run takes the folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional

log = logging.getLogger(__name__)
# ".<stem>.<8 random characters of mkstemp>.tmp<suffix>", the names atomic_path gives its temporary files
TEMP_NAME = re.compile(r"^\..*\.[A-Za-z0-9_]{8}\.tmp(\.[^./]+)?$")


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the /proc path first)
    os.umask(mask)
    return mask


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if not directory:
            raise
        return  # pragma: no cover
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path, mode: Optional[int] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is synced and replaces ``path``, on an exception it
    is removed (``path`` keeps its old content; an ``OSError``, e.g. a full disk, names ``path``).

    The temporary name keeps ``path``'s suffix (writers such as matplotlib pick the format from it). The folder
    is created. The file gets ``mode`` if given, else ``0o666`` less the umask, like any newly created file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode if mode is not None else 0o666 & ~current_umask())
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent, directory=True)  # make the rename itself durable
    except OSError as err:
        if err.filename in (None, str(tmp)):  # name the file being written (e.g. "No space left on device: '...'")
            err.filename = str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temp_files(folder: Path, depth: int = 1) -> List[Path]:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` (and its subfolders down to ``depth``
    levels, e.g. a run's ``checkpoints/``) when a process was killed mid-write.

    Call it only while holding the folder's lock (:mod:`vpt_lightning.runs.locking`): a live writer's temporary
    file would otherwise be taken from under it. Returns the removed paths.
    """
    folder = Path(folder)
    removed: List[Path] = []
    levels = [folder] if folder.is_dir() else []
    for _ in range(depth + 1):
        subfolders = []
        for current in levels:
            for entry in current.iterdir():
                if entry.is_symlink():
                    continue
                if entry.is_dir():
                    subfolders.append(entry)
                elif TEMP_NAME.match(entry.name) and entry.is_file():
                    entry.unlink(missing_ok=True)
                    removed.append(entry)
        levels = subfolders
    if removed:
        log.info(
            "removed %d temporary file(s) of an interrupted write in %s: %s",
            len(removed),
            folder,
            ", ".join(str(p.relative_to(folder)) for p in removed),
        )
    return removed


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
