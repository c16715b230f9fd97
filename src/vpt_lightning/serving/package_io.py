"""Reading and writing task package folders while a server reads them: whole versions only.

Reading (:class:`PackageReader`): a package's ``config.json`` and ``model.safetensors`` are opened through one
open handle on the package folder, so both come from the same version even when the folder is swapped for a new one
meanwhile; sizes are capped before anything is read, the safetensors header is checked against the keys and shapes
the task's layout expects before a tensor is read (:func:`checked_tensors`), and non-finite values are refused.
Every error is one line naming the file.

Writing (:func:`install_package`, :func:`remove_package`): a new version is written in full into a hidden folder
beside the package (``.NAME.new-XXXX``), synced, then swapped into place in one step (Linux ``renameat2`` with
``RENAME_EXCHANGE``; elsewhere the old folder is renamed away just before the new one is renamed in); a removal
renames the folder away before deleting it. A reader therefore sees the old version or the new one, never a mix.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Tuple

import numpy as np
import torch

from ..atomic import current_umask, fsync_path
from ..task_model import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE

#: ``config.json`` files larger than this are refused unread
MAX_CONFIG_BYTES = 4 * 2**20
#: room for the safetensors header (JSON) and alignment beyond the tensors' own bytes
HEADER_BYTES = 2**20
#: bytes per value of the largest dtype a package may hold (float64)
MAX_ITEM_BYTES = 8
#: the safetensors dtypes a task's tensors may have: floats (prompts, weights), integers (e.g. BatchNorm's count)
VALUE_DTYPES = ("F16", "BF16", "F32", "F64", "I64", "I32", "I16", "I8", "U8")
NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)
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

    def _open(self, name: str) -> int:
        try:
            return os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0), dir_fd=self.fd)
        except FileNotFoundError:
            raise FileNotFoundError(f"task package {str(self.folder)!r} has no {name}") from None

    def read(self, name: str, cap: int) -> bytes:
        """The bytes of the package's file ``name``, refused unread above ``cap`` bytes."""
        fd = self._open(name)
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(fd).st_size
            if size > cap:
                raise ValueError(f"{str(self.folder / name)!r} is {size} bytes, over the limit of {cap} for this task")
            data = handle.read(cap + 1)
        if len(data) > cap:
            raise ValueError(f"{str(self.folder / name)!r} grew over the limit of {cap} bytes while read")
        return data

    def config(self) -> bytes:
        return self.read(CONFIG_FILE, MAX_CONFIG_BYTES)

    def tensors(
        self, expected: Mapping[str, Tuple[int, ...]], device: torch.device, dtype: torch.dtype
    ) -> Tuple[Dict[str, torch.Tensor], bytes]:
        """The package's trained tensors (checked by :func:`checked_tensors`, on ``device`` in ``dtype``) and the
        bytes of its ``model.safetensors``."""
        fd = self._open(WEIGHTS_FILE)
        try:
            path = self.folder / WEIGHTS_FILE
            size = os.fstat(fd).st_size
            cap = weights_cap(expected)
            if size > cap:
                raise ValueError(f"{str(path)!r} is {size} bytes, over the {cap} its tensors can take")
            data = os.pread(fd, size + 1, 0)
            if len(data) != size:
                raise ValueError(f"{str(path)!r} changed size while read")
            # the very file opened above, where the system names open files (else the path: a swap may race)
            opened = f"/proc/self/fd/{fd}" if sys.platform.startswith("linux") else str(path)
            return checked_tensors(opened, expected, str(path), device, dtype), data
        finally:
            os.close(fd)


def check_keys(shapes: Mapping[str, Tuple[int, ...]], expected: Mapping[str, Tuple[int, ...]], origin: str) -> None:
    """Refuse tensors (key -> shape) that are not exactly the ``expected`` keys and shapes, naming ``origin``."""
    missing, unknown = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unknown:
        raise ValueError(f"{origin!r} does not hold the tensors of its task: missing {missing}, unknown {unknown}")
    for key in sorted(shapes):
        if tuple(shapes[key]) != tuple(expected[key]):
            raise ValueError(f"{origin!r}: {key} has shape {tuple(shapes[key])}, its task needs {tuple(expected[key])}")


def checked_tensors(
    filename: str,
    expected: Mapping[str, Tuple[int, ...]],
    origin: str,
    device: torch.device,
    dtype: torch.dtype,
) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file that holds exactly the ``expected`` keys and shapes in a number dtype, all
    finite; keys, shapes and dtypes are checked from the header before any tensor is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(filename, framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            check_keys({key: tuple(piece.get_shape()) for key, piece in slices.items()}, expected, origin)
            for key, piece in sorted(slices.items()):
                if piece.get_dtype() not in VALUE_DTYPES:
                    raise ValueError(
                        f"{origin!r}: {key} is {piece.get_dtype()}; a task's tensors are one of {list(VALUE_DTYPES)}"
                    )
            tensors = {key: handle.get_tensor(key) for key in sorted(slices)}
    except SafetensorError as err:
        raise ValueError(f"{origin!r} is not a readable safetensors file ({err})") from None
    return finite(tensors, origin, device, dtype)


def finite(
    tensors: Mapping[str, torch.Tensor], origin: str, device: torch.device, dtype: torch.dtype
) -> Dict[str, torch.Tensor]:
    """``tensors`` on ``device``, floats in ``dtype`` (integers, such as a BatchNorm's count, kept as they are); a
    non-finite value is refused, naming the key."""
    out = {}
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            if tensor.dtype not in INTEGER_DTYPES:
                raise ValueError(f"{origin!r}: {key} holds {tensor.dtype} values; a task's tensors are numbers")
            out[key] = tensor.detach().to(device=device).contiguous()
            continue
        values = tensor.detach().to("cpu")
        # numpy's check: one thread, microseconds (torch's parallel kernels wake a thread pool for each tensor)
        if not np.isfinite(values.numpy() if values.dtype in NUMPY_FLOATS else values.float().numpy()).all():
            raise ValueError(f"{origin!r}: {key} holds non-finite values (NaN or infinity)")
        out[key] = tensor.detach().to(device=device, dtype=dtype).contiguous()
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


def stage_package(folder: Path, name: str, files: Mapping[str, bytes]) -> Path:
    """Write ``files`` (file name -> bytes: ``config.json``, ``model.safetensors``, optionally ``README.md``) into a
    new hidden folder beside ``folder/name``, synced; returns it (install it with :func:`install_package`)."""
    unknown = sorted(set(files) - {CONFIG_FILE, WEIGHTS_FILE, CARD_FILE})
    if unknown or CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        raise ValueError(
            f"a task package is {CONFIG_FILE} and {WEIGHTS_FILE} (and optionally {CARD_FILE}); got {sorted(files)}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}.new-"))
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
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rename(target, old / "package")
        os.rename(staged, target)
    fsync_path(target.parent, directory=True)
    shutil.rmtree(old, ignore_errors=True)


def remove_package(target: Path) -> None:
    """Remove a package folder: renamed away (gone for readers in one step), then deleted."""
    trash = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.gone-"))
    try:
        os.rename(target, trash / "package")
    except FileNotFoundError:
        shutil.rmtree(trash, ignore_errors=True)
        raise FileNotFoundError(f"task package {str(target)!r} does not exist") from None
    fsync_path(target.parent, directory=True)
    shutil.rmtree(trash, ignore_errors=True)
