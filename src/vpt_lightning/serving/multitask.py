"""``MultiTaskClassifier``: tasks given at start (packages or checkpoints) on one shared frozen backbone; a batch
may mix tasks. It is a :class:`~vpt_lightning.serving.task_store.TaskStore` whose tasks are held in memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..backbones import BackboneConfig
from ..heads import import_user_code
from ..sharing.checkpoint import TaskCheckpoint
from ..task_model import TaskModel, TaskRecord
from .task_index import TASK_NAME, ServedTask, default_task_name  # noqa: F401  (imported from here before)
from .task_store import TaskStore, UnknownTask
from .task_tensors import TaskTensors
from .task_updates import Update

# the per-task module of earlier versions: a task is a TaskModel (prompted backbone + head, keys as in VPTModule)
TaskClassifier = TaskModel


class MultiTaskClassifier(TaskStore):
    """Classify a batch in which every image may belong to another task, with one copy of the frozen backbone.

    The tasks are given at start (:meth:`from_sources`, :meth:`add_task`) and held in memory as data on the shared
    model (:mod:`~vpt_lightning.serving.task_tensors`): ``forward(images, task_index)`` runs a ViT once over the
    whole batch (:mod:`~vpt_lightning.serving.mixed_pass`): each sample's prompts enter its attention as keys and
    values (or as rows of its own, where their outputs are read later, as in VPT-Shallow), so tasks of different
    prompt lengths need no padding; each LoRA or Adapter task's update is added to its own samples' rows
    (:mod:`~vpt_lightning.serving.task_updates`); linear and MLP tasks differ only in their heads. A task the pass
    cannot serve exactly (``prompt.location`` other than ``prepend``, ``prompt.pool``, ``prompt.pool_norm``, another
    method changing the model's structure, blocks other than timm's ``Block``) and other families (Swin, ConvNets)
    run each task's samples through the task's own network on a weight-sharing copy of the backbone. Each task's
    head is then applied to its rows.

    Every checkpoint's backbone identity is checked against the shared backbone (a checkpoint made on other
    weights is refused, naming the differences). Checkpoints of a method that changes backbone weights
    (``trains_backbone``: full, partial, bias) are refused: they need their own backbone copy; load them with
    ``VPTModule.load_from_checkpoint``.

    Args:
        backbone: the shared backbone: a :class:`~vpt_lightning.backbones.BackboneConfig` or its mapping (e.g. the
            ``backbone`` hparams of a task checkpoint; :meth:`from_sources` takes the first task's), or a pin (see
            :class:`~vpt_lightning.serving.task_store.TaskStore`).
    """

    @classmethod
    def from_sources(  # type: ignore[override]
        cls,
        sources: Union[Sequence[Union[str, os.PathLike]], Mapping[str, Union[str, os.PathLike]]],
        backbone: Any = None,
        allow_download: bool = False,
    ) -> "MultiTaskClassifier":
        """Load tasks (a list, or names -> sources) on one shared backbone
        (:meth:`~vpt_lightning.serving.task_store.TaskStore.from_sources`: the pinned ``backbone``, else the first
        task's own entry, timm's hub weights only with ``allow_download``). A source is a package folder, a Hub repo
        ``hf://OWNER/NAME``, a ``.ckpt`` or a run folder; every one is read and checked before the backbone is
        built."""
        if not sources:
            raise ValueError("no task given")
        return super().from_sources(sources, backbone, allow_download)  # type: ignore[return-value]

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Union[Sequence[os.PathLike], Mapping[str, os.PathLike]],
        backbone: Union[BackboneConfig, Mapping[str, Any], None] = None,
        allow_download: bool = False,
    ) -> "MultiTaskClassifier":
        """:meth:`from_sources` (task checkpoints, packages or run folders; a list or names -> paths)."""
        return cls.from_sources(checkpoints, backbone, allow_download)

    @property
    def model(self) -> torch.nn.Module:
        """The shared frozen timm model."""
        return self.backbone.model

    def add_task(self, source: Union[TaskRecord, TaskCheckpoint, str, os.PathLike], name: Optional[str] = None) -> str:
        """Load a task (a package, Hub repo ``hf://OWNER/NAME``, ``.ckpt``, run folder, or one already read) onto the
        shared backbone; returns its name (``name``, else the task's ``task_name``, else its run folder's name). A
        task that does not load changes nothing: its tensors are only ever its own (prompts, head, the method's),
        never the shared backbone's."""
        return self.add(source, name)

    @property
    def tasks(self) -> Dict[str, Union[TaskTensors, TaskModel]]:
        """Each task as the pass uses it: its :class:`~vpt_lightning.serving.task_tensors.TaskTensors` (prompts,
        updates and head as data), or its own :class:`TaskModel` for a task outside the one pass."""
        out: Dict[str, Union[TaskTensors, TaskModel]] = {}
        for name in self.task_names:
            handle = self.open(name)
            self.release([handle])
            out[name] = handle.tensors if handle.tensors.one_pass else handle.tensors.task_model()
        return out

    @property
    def updates(self) -> Dict[str, Optional[Dict[str, Update]]]:
        """Task name -> its additions to the shared model's modules (module name -> update; see
        :mod:`~vpt_lightning.serving.task_updates`), ``None`` for a task outside the one pass."""
        return {name: task.updates if isinstance(task, TaskTensors) else None for name, task in self.tasks.items()}

    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def task_index(self, names: Sequence[str]) -> torch.Tensor:
        """Task names -> the ``task_index`` tensor of :meth:`forward`; an unknown name lists the valid ones."""
        positions = {name: i for i, name in enumerate(self.task_names)}
        unknown = sorted({n for n in names if n not in positions})
        if unknown:
            raise UnknownTask(f"unknown task(s) {unknown}; the tasks are {self.task_names}")
        return torch.tensor([positions[n] for n in names], dtype=torch.long)


def parse_sources(values: Sequence[str]) -> Union[List[str], Dict[str, str]]:
    """``SOURCE`` or ``NAME=SOURCE`` arguments -> a list of sources, or names -> sources when every one is named."""
    pairs: List[Tuple[Optional[str], str]] = []
    for value in values:
        name, sep, source = value.partition("=")
        pairs.append((name, source) if sep and not Path(value).exists() else (None, value))
    if all(name for name, _ in pairs):
        return {name: source for name, source in pairs}  # type: ignore[misc]
    if any(name for name, _ in pairs):
        raise ValueError("name every checkpoint or package (NAME=SOURCE) or none (names then come from the tasks)")
    return [source for _, source in pairs]


def load_tasks(
    values: Sequence[str],
    backbone: Any = None,
    imports: Sequence[str] = (),
    folders: Sequence[Union[str, os.PathLike]] = (),
    cache_bytes: Optional[int] = None,
    pins: Sequence[str] = (),
    allow_download: bool = False,
) -> TaskStore:
    """What ``vpt-predict`` and ``vpt-serve`` serve: the tasks of ``SOURCE``/``NAME=SOURCE`` arguments (package
    folders, Hub repos ``hf://OWNER/NAME``, ``.ckpt`` files, run folders), held in memory, and those of the task
    ``folders`` (``--tasks DIR``, loaded on first use into a cache of ``cache_bytes``; ``pins`` held), on one
    backbone: pinned by ``backbone`` (``--backbone``), else the first task's own entry as
    :func:`~vpt_lightning.backbones.pin.own_backbone` allows (``allow_download``, ``--allow-download``: timm's hub
    weights it names). Without folders: a :class:`MultiTaskClassifier`.

    ``imports``: the operator's own modules (``.py`` files or dotted names) to import first, so that the heads they
    register (:func:`vpt_lightning.heads.register_head`) can be rebuilt; a task never chooses code to import.
    """
    for target in imports:
        import_user_code(target)
    sources = parse_sources(values) if values else []
    if not folders:
        if cache_bytes is not None or pins:
            raise ValueError("--cache-bytes and --pin apply to task folders (--tasks DIR)")
        return MultiTaskClassifier.from_sources(sources, backbone, allow_download)
    return TaskStore.from_sources(
        sources, backbone, allow_download, folders=folders, cache_bytes=cache_bytes, pins=pins
    )
