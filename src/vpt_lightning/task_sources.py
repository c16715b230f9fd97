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
        return _read_checkpoint(path)
    if path.is_dir() and not is_package(path):
        if is_package(path / "task"):
            path = path / "task"
        elif (path / "checkpoints" / "last.ckpt").is_file():
            return _read_checkpoint(path / "checkpoints" / "last.ckpt")
        else:
            raise FileNotFoundError(
                f"{str(path)!r} is neither a task package (no {CONFIG_FILE}) nor a run folder (no task/ package, no "
                "checkpoints/last.ckpt)"
            )
    folder = package_folder(str(path) if path.exists() else str(source), **download)
    return read_package(folder)


def _read_checkpoint(path: Path) -> TaskRecord:
    checkpoint = read_task_checkpoint(path)
    hparams = checkpoint.hparams
    if hparams.get("segmentation") is not None:
        raise ValueError(f"{str(path)!r} is a segmentation task; only classification tasks load as TaskModel")
    spec = TaskSpec.from_mapping({**hparams, "head": checkpoint.head}, origin=repr(str(path)))
    return TaskRecord(path, spec, checkpoint.state_dict, checkpoint.identity, {})


def load_task(source: Union[str, os.PathLike], backbone: Any = None, model: Optional[nn.Module] = None,
              identity: Optional[Mapping[str, Any]] = None) -> TaskModel:
    """A :class:`TaskModel` from a package folder, a Hub repo id, a ``.ckpt`` file or a run folder.

    ``backbone`` pins the frozen backbone (see :func:`backbone_pin`); ``model``/``identity`` wrap an already built
    timm model (a backbone shared by several tasks). The task's recorded backbone identity must match either way.
    """
    return assemble(read_task(source), backbone, model, identity)
