"""One process per run folder: an exclusive ``fcntl.flock`` on ``<folder>/.lock`` while a run or protocol uses it.

The lock belongs to the open file, so the operating system releases it whenever the process ends, however it ends
(SIGKILL, out of memory, power cut): there is never a stale lock to delete by hand. The holder writes its PID,
host and start time into the lock file, so a second process that finds the folder taken fails at once and says
which process holds it. Locks are re-entrant within a process (``vpt-tune`` holds its protocol folder and each run
folder inside it; ``train`` takes the run folder again). Under a multi-process launcher (DDP, SLURM) only the
rank-zero process locks: the other ranks work in the same folder on its behalf.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, folders are not guarded
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_held: Dict[Path, int] = {}  # lock file -> open descriptor, for the locks this process holds


def _close_inherited_locks() -> None:
    """In a forked child (e.g. a DataLoader worker): close the copies of the parent's lock files, so that the lock
    ends with the parent, not with the last of its children."""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:  # pragma: no cover
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class FolderLockedError(RuntimeError):
    """Another process holds the folder's lock (its PID is in the message)."""


def _launcher_rank_is_zero() -> bool:
    """True unless this process is a non-zero rank of a multi-process launch (Lightning, torchrun, SLURM)."""
    for variable in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        value = os.environ.get(variable)
        if value not in (None, "", "0"):
            return False
    return True


def lock_holder(folder: Path) -> str:
    """What the lock file of ``folder`` says about its holder (``"PID 123 on host, since ..."``), or ``""``."""
    try:
        return (Path(folder) / LOCK_FILE).read_text().strip()
    except OSError:
        return ""


@contextmanager
def folder_lock(folder: Path, what: str = "run", wait: bool = False) -> Iterator[None]:
    """Hold ``<folder>/.lock`` exclusively for the block (creating the folder); fail at once if another process
    holds it, with :class:`FolderLockedError` naming that process (``wait=True``: wait until it is released, as
    workers of one shared search do). ``what`` names the folder's role in messages."""
    folder = Path(folder).resolve()
    lock_path = folder / LOCK_FILE
    if fcntl is None or not _launcher_rank_is_zero() or lock_path in _held:
        yield  # re-entrant (or nothing to lock with)
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(folder) or "a process that has not written its PID yet"
        if not wait:
            os.close(fd)
            raise FolderLockedError(
                f"the {what} folder {str(folder)!r} is in use by another process ({holder}); wait for it to finish "
                f"or stop it, or use another folder. The lock ({lock_path}) is released as soon as that process ends."
            ) from None
        log.info("waiting for the %s folder %s, in use by %s", what, folder, holder)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"PID {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode())
        except OSError:  # e.g. a full disk: the lock holds all the same, only its note is missing
            pass
        _held[lock_path] = fd
        yield
    finally:
        _held.pop(lock_path, None)
        os.close(fd)  # releases the lock; the file stays (removing it would race with a new holder)
