"""``TaskModel``: one trained task as a plain ``nn.Module`` (prompted backbone + tuning method + head) with what
describes it (class names, eval transform, backbone identity), built by one factory and shared as a package.

A task package is a folder (or a Hugging Face Hub repo) of three files:

- ``model.safetensors``: only the trained tensors (prompts, head, the method's tensors and trained buffers), never
  the frozen backbone, so a ViT-B task is a few MB;
- ``config.json``: what rebuilds the network (see :class:`TaskSpec`) and the backbone's identity, class names,
  eval transform and metrics;
- ``README.md``: a model card with Hub front matter (``library_name: vpt-lightning``).

``TaskModel.save_pretrained(dir)``, ``TaskModel.from_pretrained(dir or "hf://OWNER/NAME", backbone=...)`` and
``push_to_hub(repo_id)`` come from ``huggingface_hub.ModelHubMixin``.

A package someone else made is data, never code (``docs/security.md``): loading never unpickles (safetensors and
JSON only), the head is rebuilt from the method or from a head registered by the operator's own code
(:mod:`vpt_lightning.heads`), the backbone entry holds values only and leads to no download or file the operator did
not choose (:mod:`vpt_lightning.backbones.pin`), the weights file may hold only the tensors its task trains, in the
shapes its config implies (:func:`check_package`, checked on the safetensors header against the network built on
the ``meta`` device within the caps of :mod:`vpt_lightning.sharing.trust`, before anything is allocated), and no
NaN/inf.
A Hub repo is downloaded only when named explicitly, ``hf://OWNER/NAME``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from PIL.Image import Image as PILImage
from torch import nn

from . import heads
from .backbones import BackboneConfig, PromptedBackbone, create_backbone, prompted_backbone
from .backbones.identity import check_backbone_identity
from .backbones.loading import create_architecture
from .backbones.pin import backbone_pin, check_file_backbone, own_backbone
from .data.transforms import INTERPOLATIONS, RECIPES
from .methods import parse_tuning
from .prompt import PromptConfig
from .runs.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from .sharing.checkpoint import trainable_state_keys
from .sharing.model_card import task_model_card
from .sharing.onnx_export import ImageLike, eval_mode, image_transform, model_input_size, prepare_images
from .sharing.regular_files import read_regular_file
from .sharing.trust import bounded_construction, check_finite, check_tensor_shapes, safetensors_shapes

PACKAGE_FORMAT = "vpt-lightning-task"
PACKAGE_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
PACKAGE_FILES = [CONFIG_FILE, WEIGHTS_FILE, CARD_FILE]
# a Hugging Face Hub repo id, OWNER/NAME; a source names one only as hf://OWNER/NAME
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_PREFIX = "hf://"
# the largest image side a task file's eval transform may ask images to be resized to
MAX_EVAL_IMAGE_SIZE = 2048


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
    ``hf://OWNER/NAME``) or :func:`vpt_lightning.sharing.task_sources.load_task` (a package, a ``.ckpt`` or a run
    folder).
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

    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        """How an RGB PIL image is prepared for :meth:`forward`: the task's :attr:`eval_transform` (the one its
        evaluation used), else resize to the backbone's input size with ImageNet mean/std, as ``vpt-predict`` does
        (:func:`~vpt_lightning.sharing.onnx_export.image_transform`)."""
        return image_transform(self.eval_transform, model_input_size(self))

    def predict(
        self, images: Union[ImageLike, Sequence[ImageLike]], top_k: int = 5, batch_size: int = 32
    ) -> List[List[Dict[str, Any]]]:
        """Classify image files or PIL images (one, or a sequence), prepared by :meth:`image_transform`: for each
        image, its ``top_k`` most probable classes (fewer if the task has fewer), most probable first, each
        ``{"index": i, "class": name, "probability": p}`` as ``vpt-predict`` and ``vpt-serve`` answer. Runs in eval
        mode without gradients, ``batch_size`` images at a time, on the task's device."""
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k={top_k!r} must be a positive integer")
        items = [images] if isinstance(images, (str, os.PathLike, PILImage)) else list(images)
        first, size = next(self.parameters()), model_input_size(self)
        answers: List[List[Dict[str, Any]]] = []
        with eval_mode(self), torch.no_grad():
            for start in range(0, len(items), batch_size):
                batch = prepare_images(items[start : start + batch_size], self.eval_transform or {}, size)
                probabilities = self(batch.to(device=first.device, dtype=first.dtype)).float().softmax(-1)
                answers += [top_classes(row, self.class_names, top_k) for row in probabilities]
        return answers

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
        allow_download: bool = False,
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
        return load_package(folder, backbone=backbone, model=model, identity=identity, allow_download=allow_download)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, Path],
        *,
        backbone: Any = None,
        allow_download: bool = False,
        **kwargs: Any,
    ) -> "TaskModel":
        """Load a task package from a folder or a Hub repo ``hf://OWNER/NAME`` (downloaded with
        ``snapshot_download``; a bare ``OWNER/NAME`` is a local path only).

        ``backbone`` pins the frozen backbone (a :class:`BackboneConfig`, its mapping, a ``conf/backbone`` name or
        a weights/YAML file, see :func:`vpt_lightning.sharing.task_sources.backbone_pin`) instead of the package's own
        ``backbone`` entry; either way the package's backbone identity must match. Without a pin the package's own
        entry is a seeded random init or the shipped quickstart backbone; timm's hub weights it names
        (``pretrained: true``) are downloaded only with ``allow_download=True``. ``model``/``identity``: an already
        built timm model to wrap (a shared backbone).
        """
        # resolve here, so that a missing folder or an unreachable Hub repo fails with one clear message
        folder = package_folder(
            str(pretrained_model_name_or_path),
            **{
                k: kwargs[k]
                for k in ("revision", "cache_dir", "force_download", "token", "local_files_only")
                if k in kwargs
            },
        )
        return super().from_pretrained(str(folder), backbone=backbone, allow_download=allow_download, **kwargs)


def top_classes(probabilities: torch.Tensor, class_names: Sequence[str], k: int) -> List[Dict[str, Any]]:
    """The ``k`` most probable classes of one image's ``probabilities`` over ``class_names`` (fewer if there are
    fewer classes), most probable first: ``{"index", "class", "probability"}`` each."""
    values, indices = probabilities.float().topk(min(k, len(class_names)))
    return [
        {"index": int(i), "class": class_names[int(i)], "probability": float(p)}
        for p, i in zip(values.tolist(), indices.tolist())
    ]


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
    saved_tensors: bool = False,
) -> TaskModel:
    """The one factory of a task's network from its parsed configs.

    Builds the frozen timm backbone (``backbone``, default ``spec.backbone``; or wraps ``model`` with its
    ``identity``, e.g. a backbone shared by several tasks), wraps it in its family's prompted backbone, applies the
    tuning method and builds the head. ``build_backbone``/``build_head`` replace those two steps (``VPTModule``
    passes its hooks, so a subclass's head ends up in the task). ``saved_tensors``: the trained tensors are then
    loaded from a file, so the method starts them from nothing it would fetch or read
    (:meth:`~vpt_lightning.methods.base.TuningMethod.config_for_saved_tensors`); the task keeps ``spec`` as given.
    """
    if not isinstance(spec, TaskSpec):
        spec = TaskSpec.from_mapping(spec)
    method, tuning = parse_tuning(spec.tuning)
    if saved_tensors:
        tuning = method.config_for_saved_tensors(tuning)
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
    return parse_package_config(read_regular_file(path), path)


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
    """A package's local folder: ``source`` itself, or the Hub repo ``hf://OWNER/NAME`` downloaded
    (``snapshot_download``, the package's three files only). A bare ``OWNER/NAME`` is a local path, never a repo id
    (a mistyped path must not download a squatted repo): missing, its error suggests ``hf://OWNER/NAME``. Offline
    or unknown, the error names the source and why."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        repo_id = text[len(HUB_PREFIX) :]
        if not REPO_ID.match(repo_id):
            raise ValueError(f"{text!r} is not a Hub model repo: write hf://OWNER/NAME")
        return _download_package(text, repo_id, revision, cache_dir, force_download, token, local_files_only)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{text!r} is a file, not a task package folder")
    hub = f"; for the Hub repo of that name write {HUB_PREFIX}{text}" if REPO_ID.match(text) else ""
    raise FileNotFoundError(
        f"{text!r} does not exist{hub}: give a task package folder (<run>/task), a .ckpt file, a run folder or a "
        "Hub repo hf://OWNER/NAME"
    )


def _download_package(
    source: str, repo_id: str, revision: Any, cache_dir: Any, force_download: bool, token: Any, local_files_only: bool
) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id=repo_id,
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
            f"{source!r}: the Hub repo could not be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); offline, give the package's "
            "folder instead"
        ) from None


def spec_of_file(values: Mapping[str, Any], origin: str) -> TaskSpec:
    """The :class:`TaskSpec` of a file someone else made (a package's ``config.json``, a ``.ckpt``'s hparams),
    values only: its ``backbone`` entry as :func:`~vpt_lightning.backbones.pin.check_file_backbone` allows, its
    ``eval_transform`` a known recipe and interpolation, an image size up to :data:`MAX_EVAL_IMAGE_SIZE` and finite
    mean/std. A ``ValueError`` names ``origin``, the key and the rule."""
    if isinstance(values, Mapping) and "backbone" in values:
        values = {**values, "backbone": check_file_backbone(values["backbone"], origin)}
    spec = TaskSpec.from_mapping(values, origin=origin)
    check_eval_transform(spec.eval_transform, origin)
    return spec


def check_eval_transform(settings: Optional[Mapping[str, Any]], origin: str) -> None:
    """Refuse eval transform settings that would fail at the first image or resize it beyond reason."""
    if settings is None:
        return
    if not isinstance(settings, Mapping):
        raise ValueError(f"{origin}: eval_transform must be a mapping, got {type(settings).__name__}")
    where = f"{origin}: eval_transform"
    if settings.get("recipe", "vtab") not in RECIPES:
        raise ValueError(f"{where}.recipe={settings.get('recipe')!r} is not one of {list(RECIPES)}")
    interpolation = settings.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{where}.interpolation={interpolation!r} is not one of {list(INTERPOLATIONS)}")
    size = settings.get("img_size")
    if size is not None and (
        not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_EVAL_IMAGE_SIZE
    ):
        raise ValueError(f"{where}.img_size={size!r} must be an integer in [1, {MAX_EVAL_IMAGE_SIZE}]")
    for key in ("mean", "std"):
        value = settings.get(key)
        if value is None:
            continue
        ok = isinstance(value, (list, tuple)) and 1 <= len(value) <= 4
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e6 for v in value)
        if not ok or (key == "std" and not all(v > 0 for v in value)):
            valid = "1 to 4 finite numbers" + (" > 0" if key == "std" else "")
            raise ValueError(f"{where}.{key}={value!r} must be {valid}")


def trained_shapes(task: TaskModel) -> Dict[str, tuple]:
    """The names and shapes of the tensors ``task`` trains, what its file must hold: every parameter that requires
    grad and every buffer outside its frozen backbone model
    (:func:`~vpt_lightning.sharing.checkpoint.trainable_state_keys`).
    The rule of every loader of a task's file, alone or on a shared backbone."""
    state = task.state_dict()
    return {k: tuple(state[k].shape) for k in trainable_state_keys(task, task.backbone.model)}


@contextlib.contextmanager
def file_network_construction(origin: str, meta: bool = True) -> Iterator[None]:
    """The block that builds the network a file someone else made describes: on the ``meta`` device (``meta``:
    nothing is allocated), within the caps of :func:`vpt_lightning.sharing.trust.bounded_construction`, the global
    random
    state untouched; any error of the build becomes a ``ValueError`` naming ``origin``. Build it with
    ``saved_tensors=True`` (:func:`build_task_model`), so that nothing is fetched or read either."""
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(bounded_construction(origin))
            stack.enter_context(torch.random.fork_rng(devices=[]))
            if meta:
                stack.enter_context(torch.device("meta"))
            yield
    except ValueError as err:
        raise ValueError(str(err) if origin in str(err) else f"{origin}: {err}") from None
    except Exception as err:  # a timm or torch error on values that passed the checks: name the file
        raise ValueError(f"{origin}: its network could not be built ({type(err).__name__}: {err})") from None


def trained_tensor_shapes(spec: TaskSpec, origin: str) -> Dict[str, tuple]:
    """The names and shapes of the tensors a task of ``spec`` trains (what its package or checkpoint must hold,
    :func:`trained_shapes`): its network built on the ``meta`` device, within the caps of
    :func:`vpt_lightning.sharing.trust.bounded_construction` (refused, naming ``origin``, beyond them), so nothing is
    allocated and nothing downloaded or read (:func:`file_network_construction`)."""
    with file_network_construction(origin):
        task = build_task_model(spec, model=create_architecture(spec.backbone), identity={}, saved_tensors=True)
        return trained_shapes(task)


def check_package(folder: os.PathLike) -> TaskSpec:
    """Check a package folder without building its network or loading its tensors: ``config.json`` holds values
    only (:func:`spec_of_file`), and ``model.safetensors``'s header (read alone) names exactly the tensors the
    task trains, in the shapes its config implies (:func:`trained_tensor_shapes`). Returns the spec; a
    ``ValueError`` names the file and the rule."""
    return _checked_package(Path(folder))[1]


def package_spec(config: Mapping[str, Any], path: os.PathLike) -> TaskSpec:
    """The spec of a package's parsed ``config.json`` (read from ``path``: :func:`parse_package_config`), values only
    (:func:`spec_of_file`): what every reader of a package (loading one, a task store's index) builds it with."""
    return spec_of_file(config, repr(str(path)))


def _checked_package(folder: Path) -> tuple:
    config = read_package_config(folder)
    config_origin = repr(str(folder / CONFIG_FILE))
    spec = package_spec(config, folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"task package {str(folder)!r} has no {WEIGHTS_FILE}")
    expected = trained_tensor_shapes(spec, config_origin)
    check_tensor_shapes(safetensors_shapes(weights), expected, repr(str(weights)))
    return config, spec


def read_package(folder: Path) -> TaskRecord:
    """A package's spec, trained tensors and identity, checked (:func:`check_package`, finite values), before any
    network is built."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config, spec = _checked_package(folder)
    weights = folder / WEIGHTS_FILE
    state = load_file(str(weights))
    check_finite(state, repr(str(weights)))
    info = {k: config[k] for k in INFO_KEYS if k in config}
    return TaskRecord(folder, spec, state, config.get("backbone_identity"), info)


def check_shares_backbone(spec: TaskSpec, origin: str) -> None:
    """Refuse a task whose method changes backbone weights (``trains_backbone``: full, partial, bias...) where it
    would share the frozen backbone with other tasks, naming ``origin``."""
    method, tuning = parse_tuning(spec.tuning)
    if method.trains_backbone:
        raise ValueError(
            f"{origin}: tuning={tuning.name} changes backbone weights, so it cannot share the frozen backbone with "
            "other tasks; load it alone with vpt_lightning.sharing.task_sources.load_task (or "
            "VPTModule.load_from_checkpoint)"
        )


def assemble(
    record: TaskRecord,
    backbone: Any = None,
    model: Optional[nn.Module] = None,
    identity: Optional[Mapping[str, Any]] = None,
    allow_download: bool = False,
) -> TaskModel:
    """Build the network a record describes and load its trained tensors; every mismatch is named with the source.

    The backbone is the operator's pin ``backbone`` (:func:`~vpt_lightning.backbones.pin.backbone_pin`), else the
    record's own entry as :func:`~vpt_lightning.backbones.pin.own_backbone` allows (``allow_download``: timm's hub
    weights it names), or ``model``, an already built timm model shared with other tasks (then a method that trains
    backbone weights is refused). The recorded backbone identity must match, and the record's tensors must be
    exactly the task's trained ones: nothing else of a file is ever loaded into the backbone."""
    origin = repr(str(record.origin))
    config_origin, weights_origin = origin, origin
    if Path(record.origin).is_dir():  # a package: name the file each check reads
        config_origin, weights_origin = (repr(str(Path(record.origin) / f)) for f in (CONFIG_FILE, WEIGHTS_FILE))
    if model is not None:
        check_shares_backbone(record.spec, origin)
    pin = None
    if model is None:
        pin = (
            backbone_pin(backbone, record.spec.backbone)
            if backbone is not None
            else own_backbone(record.spec.backbone, config_origin, allow_download)
        )
    task = build_task_model(record.spec, backbone=pin, model=model, identity=identity, saved_tensors=True)
    check_identity(record.identity, task.identity, config_origin)
    expected = trained_shapes(task)
    check_tensor_shapes({k: tuple(v.shape) for k, v in record.state_dict.items()}, expected, weights_origin)
    task.load_state_dict(record.state_dict, strict=False)
    task.__dict__["_trained_keys"] = [k for k in task.state_dict() if k in record.state_dict]
    task.info = dict(record.info)
    return task.eval()


def load_package(
    folder: os.PathLike,
    backbone: Any = None,
    model: Optional[nn.Module] = None,
    identity: Optional[Mapping[str, Any]] = None,
    allow_download: bool = False,
) -> TaskModel:
    """A :class:`TaskModel` from a package folder (``TaskModel.from_pretrained``'s work)."""
    return assemble(read_package(Path(folder)), backbone, model, identity, allow_download)
