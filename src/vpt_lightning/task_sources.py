"""Loading a task from wherever it is: a package folder, a Hub repo id, a ``.ckpt`` file or a ``vpt-train`` run
folder (one function, :func:`load_task`, used by ``vpt-predict``, ``vpt-serve``, ``vpt-export`` and
``MultiTaskClassifier``), and pinning the backbone so that a task's config cannot choose what is built.

Nothing here unpickles a foreign file: packages are JSON + safetensors, and ``.ckpt`` files are read with
``torch.load(weights_only=True)`` (:func:`vpt_lightning.checkpoint.read_task_checkpoint`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from torch import nn

from .backbones.pin import backbone_pin  # noqa: F401  (re-exported: the operator's backbone pin)
from .checkpoint import read_task_checkpoint
from .task_model import (
    CONFIG_FILE,
    TaskModel,
    TaskRecord,
    TaskSpec,
    assemble,
    package_folder,
    read_package,
)


def is_package(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_task(source: Union[str, os.PathLike], **download: Any) -> TaskRecord:
    """Read a task's spec, trained tensors and identity from a package folder, a Hub repo id, a ``.ckpt`` file
    or a run folder (its ``task/`` package, else its ``checkpoints/last.ckpt``), without building a network."""
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
        # a relative path such as quickstart/r1 is also a Hub repo id; its first folder exists here, so it is local
        parent = _local_parent(path)
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: {str(parent)!r} has no "
            f"{path.relative_to(parent).parts[0]!r} ({_runs_hint(parent)})"
        )
    folder = package_folder(str(path) if path.exists() else str(source), **download)
    return read_package(folder)


EXPECTED = (
    f"expected a task package (a folder with {CONFIG_FILE}, e.g. <run>/task), a run folder (with a task/ "
    "package or checkpoints/last.ckpt), a .ckpt file or a Hub repo id OWNER/NAME"
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
    """The deepest existing folder above a missing ``path`` whose first folder exists here (so that ``path`` is
    meant as a local path, not a Hub repo id); ``None`` otherwise."""
    if not path.is_absolute() and (len(path.parts) < 2 or not Path(path.parts[0]).is_dir()):
        return None
    parent = next((parent for parent in path.parents if parent.is_dir()), None)
    return None if parent is None or parent == Path(parent.anchor) else parent


def _read_checkpoint(path: Path) -> TaskRecord:
    checkpoint = read_task_checkpoint(path)
    hparams = checkpoint.hparams
    if hparams.get("segmentation") is not None:
        raise ValueError(f"{str(path)!r} is a segmentation task; only classification tasks load as TaskModel")
    spec = TaskSpec.from_mapping({**hparams, "head": checkpoint.head}, origin=repr(str(path)))
    return TaskRecord(path, spec, checkpoint.state_dict, checkpoint.identity, {})


def load_task(
    source: Union[str, os.PathLike],
    backbone: Any = None,
    model: Optional[nn.Module] = None,
    identity: Optional[Mapping[str, Any]] = None,
) -> TaskModel:
    """A :class:`TaskModel` from a package folder, a Hub repo id, a ``.ckpt`` file or a run folder.

    ``backbone`` pins the frozen backbone (see :func:`backbone_pin`); ``model``/``identity`` wrap an already built
    timm model (a backbone shared by several tasks). The task's recorded backbone identity must match either way.
    """
    return assemble(read_task(source), backbone, model, identity)
