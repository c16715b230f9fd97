"""Loading a task from wherever it is: a package folder, a Hub repo ``hf://OWNER/NAME``, a ``.ckpt`` file or a
``vpt-train`` run folder (one function, :func:`load_task`, used by ``vpt-predict``, ``vpt-serve``, ``vpt-export`` and
``MultiTaskClassifier``), and pinning the backbone so that a task's config cannot choose what is built.

A task file is data, never code (``docs/security.md``): packages are JSON + safetensors, ``.ckpt`` files are read
with ``torch.load(weights_only=True)`` (:func:`vpt_lightning.sharing.checkpoint.read_task_checkpoint`), and either
is checked
as :func:`vpt_lightning.task_model.read_package` says (values only, its own trained tensors in the shapes its config
implies, sizes within caps, finite values) before any network is built. A Hub repo is downloaded only when the
source says ``hf://``; a bare ``OWNER/NAME`` is a local path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from ..backbones.pin import backbone_pin  # noqa: F401  (re-exported: the operator's backbone pin)
from ..task_model import (
    CONFIG_FILE,
    HUB_PREFIX,
    TaskModel,
    TaskRecord,
    assemble,
    package_folder,
    read_package,
    spec_of_file,
    trained_tensor_shapes,
)
from .checkpoint import TaskCheckpoint, read_task_checkpoint
from .trust import check_finite, check_tensor_shapes


def is_package(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_task(source: Union[str, os.PathLike], **download: Any) -> TaskRecord:
    """Read a task's spec, trained tensors and identity from a package folder, a Hub repo ``hf://OWNER/NAME``, a
    ``.ckpt`` file or a run folder (its ``task/`` package, else its ``checkpoints/last.ckpt``), checked, without
    building a network."""
    if str(source).startswith(HUB_PREFIX):
        return read_package(package_folder(str(source), **download))
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".ckpt" and (is_package(path.parent) or is_package(path.parent / "task")):
            kind = "task package" if is_package(path.parent) else "run folder"  # e.g. <run>/task/config.json
            raise ValueError(f"{str(path)!r} is a file of the {kind} {str(path.parent)!r}; give that folder")
        return _read_checkpoint(path)
    if path.is_dir() and not is_package(path):
        if is_package(path / "task"):
            path = path / "task"
        elif (path / "checkpoints" / "last.ckpt").is_file():
            return _read_checkpoint(path / "checkpoints" / "last.ckpt")
        else:
            raise FileNotFoundError(f"{str(path)!r} is {_what_folder(path)}")
    elif not path.exists() and _local_parent(path) is not None:
        # a relative path such as quickstart/r1 whose first folder exists here: say what is missing there
        parent = _local_parent(path)
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: {str(parent)!r} has no "
            f"{path.relative_to(parent).parts[0]!r} ({_runs_hint(parent)})"
        )
    return read_package(package_folder(str(path) if path.exists() else str(source), **download))


EXPECTED = (
    f"expected a task package (a folder with {CONFIG_FILE}, e.g. <run>/task), a run folder (with a task/ "
    "package or checkpoints/last.ckpt), a .ckpt file or a Hub repo hf://OWNER/NAME"
)


def _task_sources_under(folder: Path, limit: int = 5, max_depth: int = 5, max_folders: int = 2000) -> list:
    """Up to ``limit`` task packages and run folders under ``folder`` (breadth first, a bounded search), as paths
    relative to it."""
    found, queue, seen = [], [(folder, 0)], 0
    while queue and len(found) < limit and seen < max_folders:
        current, depth = queue.pop(0)
        seen += 1
        if current != folder and (
            is_package(current) or is_package(current / "task") or (current / "checkpoints" / "last.ckpt").is_file()
        ):
            found.append(str(current.relative_to(folder)))
            continue
        if depth < max_depth:
            try:
                queue += [(child, depth + 1) for child in sorted(current.iterdir()) if child.is_dir()]
            except OSError:
                continue
    return found


def _runs_hint(folder: Path) -> str:
    runs = _task_sources_under(folder)
    return f"run folders there: {runs}" if runs else "no run folder or task package there"


def _what_folder(path: Path) -> str:
    """What a folder that is neither a package nor a run folder holds, and what would be valid."""
    if (path / "summary.json").is_file():
        found = "a vpt-tune protocol folder (its task packages are in its final runs)"
    elif (path / "results.json").is_file() or (path / ".hydra").is_dir():
        found = "a run folder without a task package or checkpoints/last.ckpt (package=false, or stopped early)"
    else:
        found = (
            f"neither a task package (no {CONFIG_FILE}) nor a run folder (no task/ package, no checkpoints/last.ckpt)"
        )
    runs = _task_sources_under(path)
    return f"{found}; {EXPECTED}" + (f"; under it: {runs}" if runs else "")


def _local_parent(path: Path) -> Optional[Path]:
    """The deepest existing folder above a missing ``path`` whose first folder exists here (so that the error can
    say what is missing there and what is); ``None`` otherwise."""
    if not path.is_absolute() and (len(path.parts) < 2 or not Path(path.parts[0]).is_dir()):
        return None
    parent = next((parent for parent in path.parents if parent.is_dir()), None)
    return None if parent is None or parent == Path(parent.anchor) else parent


def _read_checkpoint(path: Path) -> TaskRecord:
    return record_of_checkpoint(read_task_checkpoint(path))


def record_of_checkpoint(checkpoint: TaskCheckpoint) -> TaskRecord:
    """The task a checkpoint file holds, checked as a package is: its hparams values only, its tensors exactly the
    ones its task trains in the shapes its hparams imply (within the size caps), and finite."""
    origin = repr(str(checkpoint.path))
    hparams = checkpoint.hparams
    if hparams.get("segmentation") is not None:
        raise ValueError(f"{origin} is a segmentation task; only classification tasks load as TaskModel")
    spec = spec_of_file({**hparams, "head": checkpoint.head}, origin)
    others = sorted(k for k, v in checkpoint.state_dict.items() if not isinstance(v, torch.Tensor))
    if others:
        raise ValueError(f"{origin}: state_dict entries {others} are not tensors")
    shapes = {k: tuple(v.shape) for k, v in checkpoint.state_dict.items()}
    check_tensor_shapes(shapes, trained_tensor_shapes(spec, origin), origin)
    check_finite(checkpoint.state_dict, origin)
    return TaskRecord(checkpoint.path, spec, checkpoint.state_dict, checkpoint.identity, {})


def load_task(
    source: Union[str, os.PathLike],
    backbone: Any = None,
    model: Optional[nn.Module] = None,
    identity: Optional[Mapping[str, Any]] = None,
    allow_download: bool = False,
) -> TaskModel:
    """A :class:`TaskModel` from a package folder, a Hub repo ``hf://OWNER/NAME``, a ``.ckpt`` file or a run folder.

    ``backbone`` pins the frozen backbone (see :func:`backbone_pin`); ``model``/``identity`` wrap an already built
    timm model (a backbone shared by several tasks). The task's recorded backbone identity must match either way.
    Without a pin, the task's own backbone entry gives a seeded random init or the shipped quickstart backbone; the
    timm hub weights it names are downloaded only with ``allow_download``.
    """
    return assemble(read_task(source), backbone, model, identity, allow_download)
