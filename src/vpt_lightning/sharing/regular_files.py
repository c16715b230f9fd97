"""Reading a file someone else made: a regular file only, and never more than a size cap.

A path found in a folder may name a FIFO (opening it waits for a writer for ever), a device (``/dev/zero`` never
ends) or a socket, directly or through a symbolic link, or a regular file far larger than what it should hold. Each
is refused with a :class:`RefusedFileError` naming the file and the reason before anything is read: the file is
opened non-blocking (opening a FIFO returns at once) and checked on the open descriptor (so it cannot be swapped in
between), and a regular file larger than the cap is not read.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

#: ``summary.json``, ``results.json`` and a run's ``.hydra/config.yaml`` are a few kB; beyond this they are refused
MAX_SMALL_FILE_BYTES = 16 * 2**20

FILE_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


class RefusedFileError(ValueError):
    """A file that is not read: not a regular file, larger than its cap, or not openable (the message names it)."""


@contextlib.contextmanager
def open_regular_file(
    path: os.PathLike, max_bytes: int, limit_hint: str = "", folder_fd: Optional[int] = None
) -> Iterator[BinaryIO]:
    """The open (binary, blocking) handle of the regular file ``path`` of at most ``max_bytes`` bytes;
    :class:`RefusedFileError` for anything else, before any byte is read. ``limit_hint`` is added to the message
    of a file over the cap (e.g. the option that raises it). ``folder_fd``: an open descriptor of ``path``'s
    folder, through which the file (by its name) is opened: the one in the folder as it was opened, even if the
    folder's path names another one now."""
    opened = os.path.basename(path) if folder_fd is not None else path
    try:
        fd = os.open(opened, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), dir_fd=folder_fd)
    except OSError as err:
        raise RefusedFileError(f"{path}: cannot be read ({err.strerror or err})") from err
    with os.fdopen(fd, "rb", buffering=0) as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise RefusedFileError(f"{path}: {kind}, not a regular file: not read")
        if info.st_size > max_bytes:
            hint = f" ({limit_hint})" if limit_hint else ""
            raise RefusedFileError(f"{path}: {info.st_size} bytes is over the limit of {max_bytes}{hint}")
        os.set_blocking(fd, True)
        yield handle  # type: ignore[misc]


def read_regular_file(
    path: os.PathLike, max_bytes: int = MAX_SMALL_FILE_BYTES, limit_hint: str = "", folder_fd: Optional[int] = None
) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular_file`), at most ``max_bytes`` of them even
    when the file grows while it is read."""
    with open_regular_file(path, max_bytes, limit_hint, folder_fd) as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        hint = f" ({limit_hint})" if limit_hint else ""
        raise RefusedFileError(f"{path}: over the limit of {max_bytes} bytes{hint}")
    return data


def read_json_file(path: os.PathLike, max_bytes: int = MAX_SMALL_FILE_BYTES) -> Any:
    """The JSON value of a regular file of at most ``max_bytes``; :class:`RefusedFileError` for a file that is not
    read, ``ValueError`` naming the file for one that is not UTF-8 JSON."""
    data = read_regular_file(path, max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{str(Path(path))!r} is not readable JSON ({type(err).__name__}: {err})") from err
