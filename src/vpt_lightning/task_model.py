"""``TaskModel``: one trained task as a plain ``nn.Module`` (prompted backbone + tuning method + head) with what
describes it (class names, eval transform, backbone identity), built by one factory and shared as a package.

A task package is a folder (or a Hugging Face Hub repo) of three files:

- ``model.safetensors``: only the trained tensors (prompts, head, the method's tensors and trained buffers), never
  the frozen backbone, so a ViT-B task is a few MB;
- ``config.json``: what rebuilds the network (see :class:`TaskSpec`) and the backbone's identity, class names,
  eval transform and metrics;
- ``README.md``: a model card with Hub front matter (``library_name: vpt-lightning``).

``TaskModel.save_pretrained(dir)``, ``TaskModel.from_pretrained(dir_or_repo_id, backbone=...)`` and
``push_to_hub(repo_id)`` come from ``huggingface_hub.ModelHubMixin``. Loading never unpickles: safetensors and JSON
only; the head is rebuilt from the method or from a head registered by the operator's own code
(:mod:`vpt_lightning.heads`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from torch import nn

from . import heads
from .atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from .backbones import BackboneConfig, PromptedBackbone, create_backbone, prompted_backbone
from .backbones.identity import check_backbone_identity
from .backbones.pin import backbone_pin, own_backbone
from .checkpoint import trainable_state_keys
from .methods import parse_tuning
from .model_card import task_model_card
from .prompt import PromptConfig

PACKAGE_FORMAT = "vpt-lightning-task"
PACKAGE_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
PACKAGE_FILES = [CONFIG_FILE, WEIGHTS_FILE, CARD_FILE]
# a Hugging Face Hub repo id, OWNER/NAME
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class TaskSpec:
    """What rebuilds a task's network and names its outputs (the model part of a package's ``config.json``).

    Attributes:
        num_classes: classes of the task.
        backbone: :class:`~vpt_lightning.backbones.BackboneConfig` fields of the frozen backbone trained on.
        prompt: :class:`~vpt_lightning.prompt.PromptConfig` fields.
        tuning: the tuning method's config (``method`` and its options).
        head: how to rebuild the head (:mod:`vpt_lightning.heads`); ``None``: the method's head.
        task_name: the task's name (predictions and servers show it).
        class_names: the ``num_classes`` names in label order; ``None``: ``"0"``, ``"1"``...
        eval_transform: how evaluation images were prepared (``recipe``, ``img_size``, ``interpolation``, ``mean``,
            ``std``), so that image files are predicted alike.
    """

    num_classes: int
    backbone: Dict[str, Any]
    prompt: Dict[str, Any] = field(default_factory=lambda: {"num_tokens": 0})
    tuning: Dict[str, Any] = field(default_factory=dict)
    head: Optional[Dict[str, Any]] = None
    task_name: Optional[str] = None
    class_names: Optional[List[str]] = None
    eval_transform: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes!r} must be a positive integer")
        if self.class_names is not None:
            self.class_names = [str(c) for c in self.class_names]
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"class_names has {len(self.class_names)} names but num_classes={self.num_classes}")
        # validated (a bad key or value is named now) and stored as plain dicts; the method's defaults filled
        self.backbone = BackboneConfig.parse(self.backbone).to_dict()
        self.prompt = PromptConfig.parse(self.prompt).to_dict()
        self.tuning = parse_tuning(self.tuning)[1].to_dict()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], origin: str = "the task") -> "TaskSpec":
        """The spec of a config mapping (``config.json``, a checkpoint's hparams); other keys are ignored."""
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("num_classes", "backbone") if values.get(k) is None]
        if missing:
            raise ValueError(f"{origin} lacks {missing}: it does not describe a vpt-lightning task")
        try:
            return cls(**{k: v for k, v in values.items() if k in known})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{origin}: {err}") from err

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class TaskModel(
    nn.Module,
    ModelHubMixin,
    library_name="vpt-lightning",
    tags=["visual-prompt-tuning", "image-classification", "vpt-lightning"],
    pipeline_tag="image-classification",
):
    """A trained task: ``forward(images) = head(backbone(images))`` with its class names and eval transform.

    Build one with :func:`build_task_model` (from configs), :meth:`from_pretrained` (a package folder or Hub repo
    id) or :func:`vpt_lightning.task_sources.load_task` (a package, a ``.ckpt`` or a run folder).
    ``VPTModule`` trains one (``module.task``); ``MultiTaskClassifier`` serves several on one shared backbone.

    Args:
        prompted: the prompted backbone, with the tuning method applied.
        classifier: the head on the pooled features.
        spec: the :class:`TaskSpec` that rebuilds both.
        identity: the frozen backbone's identity (:func:`vpt_lightning.backbones.identity.backbone_identity`).
    """

    def __init__(self, prompted: PromptedBackbone, classifier: nn.Module, spec: TaskSpec, identity: Mapping[str, Any]):
        super().__init__()
        self.backbone = prompted
        self.head = classifier
        self.spec = spec
        self.identity: Dict[str, Any] = dict(identity)
        # filled by training (vpt-train) or read from a package: metrics, parameter counts, command, datasets
        self.info: Dict[str, Any] = {}
        self.__dict__["_trained_keys"] = None
        self.sync_image_normalization()

    def sync_image_normalization(self) -> None:
        """Normalise pixel prompts (a ConvNet's border, a ViT's ``pad``) like the images: with the mean/std of
        ``spec.eval_transform`` when it has them (the DataModule's ``data.normalization``)."""
        settings = self.spec.eval_transform or {}
        if settings.get("mean") is not None and settings.get("std") is not None:
            self.backbone.set_image_normalization(settings["mean"], settings["std"])

    # ---- what the task is -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def class_names(self) -> List[str]:
        return list(self.spec.class_names or [str(i) for i in range(self.spec.num_classes)])

    @property
    def task_name(self) -> Optional[str]:
        return self.spec.task_name

    @property
    def eval_transform(self) -> Optional[Dict[str, Any]]:
        return self.spec.eval_transform

    @property
    def method_name(self) -> str:
        return parse_tuning(self.spec.tuning)[1].name  # tuning.name, else the method's label (parse_tuning fills it)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of a batch of prepared images."""
        return self.head(self.backbone(images))

    # ---- the trained tensors ----------------------------------------------------------------------------
    def trained_state_keys(self) -> List[str]:
        """State-dict keys of what training changed (prompts, head, method tensors, trained buffers): those of the
        package's file for a loaded task, else every parameter that requires grad and every buffer outside the
        frozen backbone model."""
        if self._trained_keys is not None:
            return list(self._trained_keys)
        return trainable_state_keys(self, self.backbone.model)

    def trained_state_dict(self) -> Dict[str, torch.Tensor]:
        """The trained tensors on the CPU, contiguous (what ``model.safetensors`` holds)."""
        state = self.state_dict()
        return {k: state[k].detach().to("cpu").clone().contiguous() for k in self.trained_state_keys()}

    # ---- packages ---------------------------------------------------------------------------------------
    def package_config(self) -> Dict[str, Any]:
        """The ``config.json`` of this task's package."""
        if self.spec.head is None:
            method, tuning = parse_tuning(self.spec.tuning)
            self.spec.head = heads.describe_head(
                self.head, method, tuning, self.backbone.num_features, self.num_classes
            )
            if self.spec.head is None:
                raise ValueError(
                    f"the head {type(self.head).__module__}.{type(self.head).__qualname__} cannot be rebuilt by name: "
                    "register its class with @vpt_lightning.heads.register_head('NAME') (see vpt_lightning.heads)"
                )
        return {
            "format": PACKAGE_FORMAT,
            "format_version": PACKAGE_FORMAT_VERSION,
            "vpt_lightning_version": package_version(),
            **self.spec.to_dict(),
            "backbone_identity": self.identity,
            **{k: v for k, v in self.info.items() if k in INFO_KEYS},
        }

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write ``model.safetensors``, ``config.json`` and ``README.md`` (called by ``save_pretrained``)."""
        from safetensors.torch import save

        save_directory = Path(save_directory)
        config = self.package_config()
        write_bytes_atomic(save(self.trained_state_dict(), metadata={"format": "pt"}), save_directory / WEIGHTS_FILE)
        write_json_atomic(config, save_directory / CONFIG_FILE)
        write_text_atomic(str(self.generate_model_card()), save_directory / CARD_FILE)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The package's model card: Hub front matter and the method, parameters, figures, command, citation."""
        return task_model_card(self)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        force_download: bool = False,
        proxies: Optional[Dict] = None,
        resume_download: Optional[bool] = None,
        local_files_only: bool = False,
        token: Union[str, bool, None] = None,
        backbone: Any = None,
        model: Optional[nn.Module] = None,
        identity: Optional[Mapping[str, Any]] = None,
        **unused: Any,
    ) -> "TaskModel":
        folder = package_folder(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        return load_package(folder, backbone=backbone, model=model, identity=identity)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Union[str, Path], *, backbone: Any = None, **kwargs: Any
    ) -> "TaskModel":
        """Load a task package from a folder or a Hub repo id (downloaded with ``snapshot_download``).

        ``backbone`` pins the frozen backbone (a :class:`BackboneConfig`, its mapping, a ``conf/backbone`` name or
        a weights/YAML file, see :func:`vpt_lightning.task_sources.backbone_pin`) instead of the package's own
        ``backbone`` entry; either way the package's backbone identity must match. ``model``/``identity``: an
        already built timm model to wrap (a shared backbone).
        """
        # resolve here, so that a missing folder or an unreachable repo id fails with one clear message
        folder = package_folder(
            str(pretrained_model_name_or_path),
            **{
                k: kwargs[k]
                for k in ("revision", "cache_dir", "force_download", "token", "local_files_only")
                if k in kwargs
            },
        )
        return super().from_pretrained(str(folder), backbone=backbone, **kwargs)


def package_version() -> str:
    """The installed vpt-lightning version (written into packages)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vpt-lightning")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


# config.json keys filled from TaskModel.info (training's record of the task)
INFO_KEYS = ("metrics", "trainable_params", "backbone_params", "trainable_percent", "command", "datasets", "epochs")


def build_task_model(
    spec: Union[TaskSpec, Mapping[str, Any]],
    *,
    backbone: Union[BackboneConfig, Mapping[str, Any], None] = None,
    model: Optional[nn.Module] = None,
    identity: Optional[Mapping[str, Any]] = None,
    backbone_eval: bool = True,
    build_backbone: Optional[Callable[[nn.Module], PromptedBackbone]] = None,
    build_head: Optional[Callable[[int, int], nn.Module]] = None,
) -> TaskModel:
    """The one factory of a task's network from its parsed configs.

    Builds the frozen timm backbone (``backbone``, default ``spec.backbone``; or wraps ``model`` with its
    ``identity``, e.g. a backbone shared by several tasks), wraps it in its family's prompted backbone, applies the
    tuning method and builds the head. ``build_backbone``/``build_head`` replace those two steps (``VPTModule``
    passes its hooks, so a subclass's head ends up in the task).
    """
    if not isinstance(spec, TaskSpec):
        spec = TaskSpec.from_mapping(spec)
    method, tuning = parse_tuning(spec.tuning)
    if model is None:
        config = backbone if backbone is not None else spec.backbone
        model, identity = create_backbone(config)
    elif identity is None:
        raise ValueError("build_task_model(model=...) needs the model's identity too")
    if build_backbone is None:
        prompted = prompted_backbone(model, PromptConfig.from_mapping(spec.prompt), backbone_eval=backbone_eval)
        method.apply(prompted, tuning)
    else:
        prompted = build_backbone(model)
    if build_head is None:
        head = heads.build_head(spec.head, method, tuning, prompted.num_features, spec.num_classes)
    else:
        head = build_head(prompted.num_features, spec.num_classes)
    return TaskModel(prompted, head, spec, identity)


def check_identity(task_identity: Optional[Mapping[str, Any]], current: Mapping[str, Any], origin: str) -> None:
    """Refuse a task whose recorded backbone identity differs from ``current``, naming the file."""
    if task_identity is None:
        raise ValueError(f"{origin} records no backbone identity, so it cannot be checked against the backbone")
    try:
        check_backbone_identity(task_identity, current)
    except ValueError as err:
        raise ValueError(f"{origin}: {err}") from None


def read_package_config(folder: os.PathLike) -> Dict[str, Any]:
    """The ``config.json`` of a package folder, checked to be a vpt-lightning task package."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a task package: it has no {CONFIG_FILE}")
    return parse_package_config(path.read_bytes(), path)


def parse_package_config(data: bytes, path: os.PathLike) -> Dict[str, Any]:
    """A package's ``config.json`` from its bytes (read from ``path``), checked to be a vpt-lightning task
    package config."""
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != PACKAGE_FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a vpt-lightning task package config (format must be {PACKAGE_FORMAT!r})"
        )
    version = config.get("format_version")
    if not isinstance(version, int) or version > PACKAGE_FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has package format_version {version!r}; this vpt-lightning reads up to "
            f"{PACKAGE_FORMAT_VERSION} (upgrade vpt-lightning)"
        )
    return config


# ---- reading packages ---------------------------------------------------------------------------------
@dataclass
class TaskRecord:
    """A task as read from its source, before any network is built: the spec, trained tensors and identity."""

    origin: Path
    spec: TaskSpec
    state_dict: Dict[str, torch.Tensor]
    identity: Optional[Dict[str, Any]]
    info: Dict[str, Any]


def package_folder(
    source: Union[str, os.PathLike],
    revision: Optional[str] = None,
    cache_dir: Any = None,
    force_download: bool = False,
    token: Any = None,
    local_files_only: bool = False,
) -> Path:
    """A package's local folder: ``source`` itself, or the Hub repo ``source`` downloaded (``snapshot_download``,
    the package's three files only). Offline or unknown, the error names the source and why."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{str(source)!r} is a file, not a task package folder")
    if not REPO_ID.match(str(source)):
        raise FileNotFoundError(
            f"{str(source)!r} does not exist: give a task package folder (<run>/task), a .ckpt file, a run folder or "
            "a Hub repo id OWNER/NAME"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id=str(source),
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
                allow_patterns=PACKAGE_FILES,
            )
        )
    except Exception as err:  # offline (no network, HF_HUB_OFFLINE=1), unknown repo, no access
        raise ValueError(
            f"{str(source)!r} is no local folder, and the Hub repo of that id could not be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); offline, give the package's "
            "folder instead"
        ) from None


def read_package(folder: Path) -> TaskRecord:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_package_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"task package {str(folder)!r} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{str(weights)!r} is not a safetensors file ({err}); a task package's weights are read as safetensors "
            "only, never unpickled"
        ) from None
    spec = TaskSpec.from_mapping(config, origin=repr(str(folder / CONFIG_FILE)))
    info = {k: config[k] for k in INFO_KEYS if k in config}
    return TaskRecord(folder, spec, state, config.get("backbone_identity"), info)


def assemble(
    record: TaskRecord,
    backbone: Any = None,
    model: Optional[nn.Module] = None,
    identity: Optional[Mapping[str, Any]] = None,
) -> TaskModel:
    """Build the network a record describes (on the pinned ``backbone``, or wrapping ``model``), check the
    backbone identity and load the trained tensors; every mismatch is named with the source."""
    origin = repr(str(record.origin))
    pin = None
    if model is None:
        pin = (
            backbone_pin(backbone, record.spec.backbone)
            if backbone is not None
            else own_backbone(record.spec.backbone, origin)
        )
    task = build_task_model(record.spec, backbone=pin, model=model, identity=identity)
    check_identity(record.identity, task.identity, origin)
    own = task.state_dict()
    expected = {k for k in own if not k.startswith("backbone.model.")}
    missing, unexpected = sorted(expected - set(record.state_dict)), sorted(set(record.state_dict) - set(own))
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in record.state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{origin} does not fit the model its config describes: missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {shapes}"
        )
    task.load_state_dict(record.state_dict, strict=False)
    task.__dict__["_trained_keys"] = [k for k in own if k in record.state_dict]
    task.info = dict(record.info)
    return task.eval()


def load_package(
    folder: os.PathLike,
    backbone: Any = None,
    model: Optional[nn.Module] = None,
    identity: Optional[Mapping[str, Any]] = None,
) -> TaskModel:
    """A :class:`TaskModel` from a package folder (``TaskModel.from_pretrained``'s work)."""
    return assemble(read_package(Path(folder)), backbone, model, identity)
