"""Reading and writing task package folders while a server reads them: whole versions only.

Reading (:class:`PackageReader`): a package's ``config.json`` and ``model.safetensors`` are opened through one
open handle on the package folder, so both come from the same version even when the folder is swapped for a new one
meanwhile. What a package may hold is checked by the package loader's own functions (``docs/security.md``): both
files are regular files within their caps (:mod:`vpt_lightning.sharing.regular_files`: the small-file cap for
``config.json``, what its tensors can take for the weights), the safetensors header holds exactly the task's trained
keys and shapes before a tensor is read (:func:`vpt_lightning.sharing.trust.safetensors_shapes`,
:func:`~vpt_lightning.sharing.trust.check_tensor_shapes`), and every value is finite
(:func:`~vpt_lightning.sharing.trust.check_finite`). Only the store's own need is here: the tensors used as they
are, so of
a number dtype, on the shared model's device and dtype (:func:`placed`). Every error is one line naming the file.

Writing (:func:`install_package`, :func:`remove_package`): a new version is written in full into a hidden folder
beside the package (``.NAME.new-XXXX``), synced, then swapped into place in one step (Linux ``renameat2`` with
``RENAME_EXCHANGE``; elsewhere the old folder is renamed away just before the new one is renamed in); a removal
renames the folder away before deleting it. A reader therefore sees the old version or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Tuple

import torch

from ..runs.atomic import current_umask, fsync_path
from ..sharing.regular_files import RefusedFileError, open_regular_file, read_regular_file
from ..sharing.trust import check_finite, check_tensor_shapes, safetensors_shapes
from ..task_model import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE

#: room for the safetensors header (JSON) and alignment beyond the tensors' own bytes
HEADER_BYTES = 2**20
#: bytes per value of the largest dtype a package may hold (float64)
MAX_ITEM_BYTES = 8
#: the dtypes a task's tensors may have, used as they are: floats (prompts, weights), integers (a BatchNorm's count)
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
#: a folder's identity and last change: ``(inode, mtime_ns, ctime_ns)``
Stamp = Tuple[int, int, int]


def stamp_of(stat: os.stat_result) -> Stamp:
    return (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)


def weights_cap(expected: Mapping[str, Tuple[int, ...]]) -> int:
    """The largest ``model.safetensors`` a package with the ``expected`` tensors may be."""
    values = sum(int(torch.Size(shape).numel()) for shape in expected.values())
    return values * MAX_ITEM_BYTES + HEADER_BYTES


class PackageReader:
    """A package folder opened once: its files read from that very folder (see the module doc)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(self.folder, flags)
        except FileNotFoundError:
            raise FileNotFoundError(f"task package {str(self.folder)!r} does not exist (any more)") from None
        except NotADirectoryError:
            raise ValueError(f"{str(self.folder)!r} is not a task package folder") from None
        self.stamp = stamp_of(os.fstat(self.fd))

    def __enter__(self) -> "PackageReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextlib.contextmanager
    def _gone_as_missing(self, name: str) -> Iterator[None]:
        """A file of the package that is not there any more raises ``FileNotFoundError`` (a version swapped out and
        deleted meanwhile: its reader tries the new one); any other refusal as it is."""
        try:
            yield
        except RefusedFileError as err:
            if isinstance(err.__cause__, FileNotFoundError):
                raise FileNotFoundError(f"task package {str(self.folder)!r} has no {name}") from None
            raise

    def config(self) -> bytes:
        """The bytes of ``config.json``, read as every small file someone else made
        (:func:`~vpt_lightning.sharing.regular_files.read_regular_file`: a regular file within the cap)."""
        with self._gone_as_missing(CONFIG_FILE):
            return read_regular_file(self.folder / CONFIG_FILE, folder_fd=self.fd)

    def tensors(
        self, expected: Mapping[str, Tuple[int, ...]], device: torch.device, dtype: torch.dtype
    ) -> Tuple[Dict[str, torch.Tensor], bytes]:
        """The package's trained tensors (exactly the ``expected`` keys and shapes, checked on the header before a
        tensor is read; finite; :func:`placed` on ``device`` in ``dtype``) and the bytes of its
        ``model.safetensors`` (a regular file of at most :func:`weights_cap` bytes)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        path, cap, hint = self.folder / WEIGHTS_FILE, weights_cap(expected), "what its task's tensors can take"
        with self._gone_as_missing(WEIGHTS_FILE), open_regular_file(path, cap, hint, folder_fd=self.fd) as handle:
            # the very file opened, where the system names open files (else the path: a swap may race)
            opened = f"/proc/self/fd/{handle.fileno()}" if sys.platform.startswith("linux") else str(path)
            check_tensor_shapes(safetensors_shapes(opened, str(path)), expected, repr(str(path)))
            data = handle.read(cap + 1)
        if len(data) > cap:
            raise RefusedFileError(f"{path}: over the limit of {cap} bytes ({hint})")
        try:  # the bytes read, which are the version's (and its name's, content_version)
            tensors = load(data)
        except SafetensorError as err:  # changed in place since its header was read
            raise ValueError(f"{str(path)!r} is not a safetensors file ({err})") from None
        check_tensor_shapes({k: tuple(v.shape) for k, v in tensors.items()}, expected, repr(str(path)))
        check_finite(tensors, repr(str(path)))
        return placed(tensors, str(path), device, dtype), data


def placed(
    tensors: Mapping[str, torch.Tensor], origin: str, device: torch.device, dtype: torch.dtype
) -> Dict[str, torch.Tensor]:
    """Checked tensors as the one pass uses them: on ``device``, floats in ``dtype``, integers (a BatchNorm's
    count) kept as they are; any other dtype (bool, complex...) is refused, naming the key."""
    out = {}
    for key, tensor in tensors.items():
        if tensor.is_floating_point():
            out[key] = tensor.detach().to(device=device, dtype=dtype).contiguous()
        elif tensor.dtype in INTEGER_DTYPES:
            out[key] = tensor.detach().to(device=device).contiguous()
        else:
            raise ValueError(f"{origin!r}: {key} holds {tensor.dtype} values; a task's tensors are numbers")
    return out


def tensors_version(tensors: Mapping[str, torch.Tensor]) -> str:
    """A version name for tensors held in memory (a task read from a checkpoint): 16 hex digits of a SHA-256 over
    the keys, shapes and values."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def content_version(config: bytes, weights: bytes) -> str:
    """A package version's name: the first 16 hex digits of the SHA-256 of its ``config.json`` and
    ``model.safetensors`` (what ``vpt-serve`` answers with, ``version``)."""
    digest = hashlib.sha256()
    for data in (config, weights):
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


# ---- writing ------------------------------------------------------------------------------------------------
RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - glibc < 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: a file system without it
        return False
    raise OSError(errno, os.strerror(errno), str(b))


#: the hidden folders beside a package that a put or a delete makes: ``.NAME.new-*`` (the package being written),
#: ``.NAME.old-*`` (the version it replaced), ``.NAME.gone-*`` (a removed package), each with tempfile's 8 characters
STAGING_NAME = re.compile(r"\.(.+)\.(new|old|gone)-[a-z0-9_]{8}")
#: such a folder untouched for this long was left by a process that died mid-way (a put writes in seconds)
STALE_STAGING_SECONDS = 3600


def staging_folder(folder: Path, name: str, kind: str) -> Path:
    """A new hidden folder ``.NAME.KIND-*`` in ``folder`` (``kind``: new, old or gone; see :data:`STAGING_NAME`)."""
    return Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}.{kind}-"))


def remove_stale_staging(folder: Path, older_than: float = STALE_STAGING_SECONDS) -> List[Path]:
    """Remove the staging folders (:data:`STAGING_NAME`) in ``folder`` untouched for ``older_than`` seconds: what a
    put or delete killed mid-way left (never a link, another hidden folder or a package); returns their paths."""
    removed = []
    deadline = time.time() - older_than
    for entry in os.scandir(folder):
        if not STAGING_NAME.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        if entry.stat(follow_symlinks=False).st_mtime < deadline:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def stage_package(folder: Path, name: str, files: Mapping[str, bytes]) -> Path:
    """Write ``files`` (file name -> bytes: ``config.json``, ``model.safetensors``, optionally ``README.md``) into a
    new hidden folder beside ``folder/name``, synced; returns it (install it with :func:`install_package`)."""
    unknown = sorted(set(files) - {CONFIG_FILE, WEIGHTS_FILE, CARD_FILE})
    if unknown or CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        raise ValueError(
            f"a task package is {CONFIG_FILE} and {WEIGHTS_FILE} (and optionally {CARD_FILE}); got {sorted(files)}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    staged = staging_folder(folder, name, "new")
    try:
        os.chmod(staged, 0o777 & ~current_umask())
        for file_name, data in files.items():
            path = staged / file_name
            with open(path, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        fsync_path(staged, directory=True)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def install_package(staged: Path, target: Path) -> None:
    """Put the staged package folder at ``target`` in one step, replacing the version there (which is deleted)."""
    if not target.exists():
        try:
            os.rename(staged, target)
            fsync_path(target.parent, directory=True)
            return
        except OSError:  # created meanwhile: replace it below
            if not target.exists():
                raise
    if _exchange(staged, target):
        old = staged  # the old version now sits at the staged name
    else:
        old = staging_folder(target.parent, target.name, "old")
        os.rename(target, old / "package")
        os.rename(staged, target)
    fsync_path(target.parent, directory=True)
    shutil.rmtree(old, ignore_errors=True)


def remove_package(target: Path) -> None:
    """Remove a package folder: renamed away (gone for readers in one step), then deleted."""
    trash = staging_folder(target.parent, target.name, "gone")
    try:
        os.rename(target, trash / "package")
    except FileNotFoundError:
        shutil.rmtree(trash, ignore_errors=True)
        raise FileNotFoundError(f"task package {str(target)!r} does not exist") from None
    fsync_path(target.parent, directory=True)
    shutil.rmtree(trash, ignore_errors=True)
