"""``MultiTaskClassifier``: many tasks (packages or checkpoints) on one shared frozen backbone; a batch may mix
tasks."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..backbones import BackboneConfig, PromptedBackbone, create_backbone, prompted_backbone
from ..backbones.identity import identity_differences
from ..backbones.pin import backbone_pin, own_backbone
from ..checkpoint import TaskCheckpoint
from ..heads import import_user_code
from ..methods import parse_tuning
from ..task_model import TaskModel, TaskRecord, assemble
from ..task_sources import read_task, record_of_checkpoint
from .mixed_pass import joins_with_prompts, mixed_features, shares_blocks
from .shared_weights import weight_sharing_copy
from .task_updates import Update, task_updates

TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class ServedTask:
    """What a served task is: its name, classes, tuning method, source (package or checkpoint) and eval transform."""

    name: str
    class_names: List[str]
    method: str
    path: Path
    eval_transform: Optional[Dict[str, Any]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "method": self.method, "num_classes": self.num_classes, "classes": self.class_names}


# the per-task module of earlier versions: a task is a TaskModel (prompted backbone + head, keys as in VPTModule)
TaskClassifier = TaskModel


class MultiTaskClassifier(nn.Module):
    """Classify a batch in which every image may belong to another task, with one copy of the frozen backbone.

    Each task is a :class:`~vpt_lightning.task_model.TaskModel` built on a weight-sharing copy of the shared timm
    model (:mod:`~vpt_lightning.serving.shared_weights`): its method may add modules to its copy (LoRA, adapters)
    but never changes the model the other tasks use, and the frozen weights are held once.
    ``forward(images, task_index)`` runs a ViT once over the whole batch (:mod:`~vpt_lightning.serving.mixed_pass`):
    each sample's prompts enter its attention as keys and values (or as rows of its own, where their outputs are
    read later, as in VPT-Shallow), so tasks of different prompt lengths need no padding; each LoRA or Adapter
    task's update is added to its own samples' rows (:mod:`~vpt_lightning.serving.task_updates`); linear and MLP
    tasks differ only in their heads. A task the pass cannot serve exactly (``prompt.location`` other than
    ``prepend``, ``prompt.pool``, ``prompt.pool_norm``, another method changing the model's structure, blocks
    other than timm's ``Block``) and other families (Swin, ConvNets) run each task's samples through the task's own
    backbone. Each task's head is then applied to its rows.

    Every checkpoint's backbone identity is checked against the shared backbone (a checkpoint made on other
    weights is refused, naming the differences). Checkpoints of a method that changes backbone weights
    (``trains_backbone``: full, partial, bias) are refused: they need their own backbone copy; load them with
    ``VPTModule.load_from_checkpoint``.

    Args:
        backbone: the shared backbone's :class:`~vpt_lightning.backbones.BackboneConfig` (e.g. the ``backbone``
            hparams of a task checkpoint; :meth:`from_checkpoints` takes the first one's).
    """

    def __init__(self, backbone: Union[BackboneConfig, Mapping[str, Any]]) -> None:
        super().__init__()
        config = BackboneConfig.parse(backbone)
        model, self.identity = create_backbone(config)
        self.backbone_config = config
        self.backbone: PromptedBackbone = prompted_backbone(model, None)  # the shared model, without prompts
        self.tasks = nn.ModuleDict()
        self.infos: Dict[str, ServedTask] = {}
        # task name -> the additions its method makes to the shared model's modules (see task_updates); None: the
        # task does not join the one pass and runs through its own backbone
        self.updates: Dict[str, Optional[Dict[str, Update]]] = {}
        self.eval()

    @classmethod
    def from_sources(
        cls,
        sources: Union[Sequence[Union[str, os.PathLike]], Mapping[str, Union[str, os.PathLike]]],
        backbone: Any = None,
        allow_download: bool = False,
    ) -> "MultiTaskClassifier":
        """Load tasks (a list, or names -> sources) on one shared backbone: the pinned ``backbone`` (see
        :func:`~vpt_lightning.backbones.pin.backbone_pin`: a config, a ``conf/backbone`` name, a YAML or weights
        file), else the first task's own entry as :func:`~vpt_lightning.backbones.pin.own_backbone` allows (its
        seeded random init or the shipped quickstart backbone; timm's hub weights only with ``allow_download``).
        A source is a package folder, a Hub repo ``hf://OWNER/NAME``, a ``.ckpt`` or a run folder; every one is
        read and checked before the backbone is built."""
        items = list(sources.items()) if isinstance(sources, Mapping) else [(None, p) for p in sources]
        if not items:
            raise ValueError("no task given")
        read = [(name, read_task(source)) for name, source in items]
        first = read[0][1]
        if backbone is not None:
            config = backbone_pin(backbone, first.spec.backbone)
        else:
            config = own_backbone(first.spec.backbone, repr(str(first.origin)), allow_download)
        model = cls(config)
        for name, record in read:
            model.add_task(record, name)
        return model

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
    def model(self) -> nn.Module:
        """The shared frozen timm model."""
        return self.backbone.model

    @property
    def task_names(self) -> List[str]:
        return list(self.tasks.keys())

    def add_task(self, source: Union[TaskRecord, TaskCheckpoint, str, os.PathLike], name: Optional[str] = None) -> str:
        """Load a task (a package, Hub repo ``hf://OWNER/NAME``, ``.ckpt``, run folder, or one already read) onto the
        shared backbone as a :class:`~vpt_lightning.task_model.TaskModel`; returns its name (``name``, else the
        task's ``task_name``, else its run folder's name). A task that does not load changes nothing: its tensors
        are only ever its own (prompts, head, the method's), never the shared backbone's."""
        if isinstance(source, TaskCheckpoint):
            source = record_of_checkpoint(source)
        record = source if isinstance(source, TaskRecord) else read_task(source)
        path, spec = record.origin, record.spec
        name = name or spec.task_name or default_task_name(path)
        if not TASK_NAME.match(name):
            raise ValueError(f"task name {name!r} ({str(path)!r}) may hold only letters, digits, '_' and '-'")
        if name in self.tasks:
            raise ValueError(
                f"task name {name!r} of {str(path)!r} is already taken by {str(self.infos[name].path)!r}; name the "
                "tasks explicitly (NAME=PATH on the command line, a mapping in Python)"
            )
        method, tuning = parse_tuning(spec.tuning)
        if method.trains_backbone:
            raise ValueError(
                f"{str(path)!r}: tuning={tuning.name} changes backbone weights, so it cannot share the frozen backbone "
                "with other tasks; load it alone with vpt_lightning.task_sources.load_task "
                "(or VPTModule.load_from_checkpoint)"
            )
        if record.identity is None:
            raise ValueError(
                f"{str(path)!r} records no backbone identity, so it cannot be checked against the backbone"
            )
        differences = identity_differences(record.identity, self.identity)
        if differences:
            raise ValueError(
                f"{str(path)!r} was trained on another backbone than the shared one ({self.backbone_config.name}, "
                f"weights {self.identity.get('weights')}); differences: {'; '.join(differences)}"
            )
        task = assemble(record, model=weight_sharing_copy(self.model), identity=self.identity)
        if any(p.requires_grad for p in self.model.parameters()):
            self.model.requires_grad_(False)
            raise ValueError(f"{str(path)!r}: tuning={tuning.name} unfreezes backbone weights; it cannot share them")
        joins = shares_blocks(self.backbone) and joins_with_prompts(task.backbone)
        self.updates[name] = task_updates(self.model, task.backbone.model) if joins else None
        self.tasks[name] = task.requires_grad_(False).eval().to(self.model_device())
        self.infos[name] = ServedTask(name, task.class_names, task.method_name, Path(path), task.eval_transform)
        return name

    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def task_index(self, names: Sequence[str]) -> torch.Tensor:
        """Task names -> the ``task_index`` tensor of :meth:`forward`; an unknown name lists the valid ones."""
        positions = {name: i for i, name in enumerate(self.tasks)}
        unknown = sorted({n for n in names if n not in positions})
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the tasks are {self.task_names}")
        return torch.tensor([positions[n] for n in names], dtype=torch.long)

    def forward(self, images: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C_max)``: row ``b`` holds the logits of task ``task_index[b]`` in its first ``C`` columns
        and ``-inf`` after them (so a softmax over the row gives that task's probabilities)."""
        tasks: List[TaskModel] = list(self.tasks.values())
        updates = list(self.updates.values())
        task_index = task_index.to(images.device)
        present = [int(t) for t in torch.unique(task_index).tolist()]
        # forward hooks on the shared blocks or global ones would not run in the one pass: then each task runs alone
        one_pass = [t for t in present if updates[t] is not None] if shares_blocks(self.backbone) else []
        features: Optional[torch.Tensor] = None
        if one_pass:  # every sample of these tasks in one pass of the shared backbone
            rows = torch.isin(task_index, torch.tensor(one_pass, device=images.device))
            every = bool(rows.all())
            out = mixed_features(
                self.backbone,
                [t.backbone for t in tasks],
                [u or {} for u in updates],
                images if every else images[rows],
                task_index if every else task_index[rows],
            )
            if every:
                features = out
            else:
                features = out.new_empty(images.shape[0], out.shape[1])
                features[rows] = out
        for t in present:  # the other tasks: one pass each, through the task's own backbone
            if t in one_pass:
                continue
            rows = task_index == t
            out = tasks[t].backbone(images[rows])
            if features is None:
                features = out.new_empty(images.shape[0], out.shape[1])
            features[rows] = out
        widths = [self.infos[name].num_classes for name in self.tasks]
        logits = features.new_full((images.shape[0], max(widths[t] for t in present)), float("-inf"))
        for t in present:
            rows = task_index == t
            logits[rows, : widths[t]] = tasks[t].head(features[rows]).to(logits.dtype)
        return logits

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes of the shared backbone and of each task's own tensors (prompts and head)."""

        def size(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)

        shared_tensors = self.model.state_dict().values()
        shared = size(shared_tensors)
        held = {t.data_ptr() for t in shared_tensors}
        per_task = {  # what the task holds besides the shared weights: prompts, head, LoRA or adapter tensors...
            name: size(v for v in task.state_dict().values() if v.data_ptr() not in held)
            for name, task in self.tasks.items()
        }
        return {"backbone": shared, **{f"task:{k}": v for k, v in per_task.items()}}


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
    values: Sequence[str], backbone: Any = None, imports: Sequence[str] = (), allow_download: bool = False
) -> MultiTaskClassifier:
    """What ``vpt-predict`` and ``vpt-serve`` serve: the tasks of ``SOURCE``/``NAME=SOURCE`` arguments (package
    folders, Hub repos ``hf://OWNER/NAME``, ``.ckpt`` files, run folders) on one backbone, pinned by ``backbone``
    (``--backbone``); ``allow_download`` (``--allow-download``): the first task's own backbone may be timm's hub
    weights it names.

    ``imports``: the operator's own modules (``.py`` files or dotted names) to import first, so that the heads they
    register (:func:`vpt_lightning.heads.register_head`) can be rebuilt; a task never chooses code to import.
    """
    for target in imports:
        import_user_code(target)
    return MultiTaskClassifier.from_sources(parse_sources(values), backbone, allow_download)


def default_task_name(path: Path) -> str:
    """A task's name from its source: the run's task folder for ``<task>/<run>/checkpoints/last.ckpt`` and
    ``<task>/<run>/task``, else the file's stem or the folder's name."""
    path = Path(path)
    if path.parent.name == "checkpoints" and len(path.parents) >= 3:
        return path.parents[2].name
    if path.is_dir() and path.name == "task" and len(path.parents) >= 2:
        return path.parents[1].name
    return re.sub(r"[^A-Za-z0-9_-]", "_", path.stem if path.is_file() else path.name)
