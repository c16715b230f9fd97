"""ONNX export of a trained task: one graph from prepared images to logits (backbone, prompts, head), checked
against PyTorch with onnxruntime on images put through the task's own evaluation transform.

The graph takes ``images`` (``float32``, ``(batch, 3, size, size)``, already resized and normalised as the eval
transform does) and returns ``logits`` (``(batch, num_classes)``); the batch axis is dynamic. How to prepare the
images (the eval transform's settings) and the class names are stored in the file's metadata
(``vpt_lightning.eval_transform``, ``vpt_lightning.class_names``, JSON), so a runtime without PyTorch can
prepare inputs and name predictions.

Export uses ``torch.onnx.export`` with the ``torch.export``-based exporter (``dynamo=True``, PyTorch's default
since 2.9; it needs ``onnxscript``). Needs the ``onnx`` extra: ``pip install "vpt-lightning[onnx]"``.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
from ..dataclass_config import plain_mapping
from ..runs.atomic import atomic_path

#: the largest logit difference (fp32) between onnxruntime and PyTorch that :func:`check_onnx` callers accept
MAX_LOGIT_DIFF = 1e-4
#: the default ONNX opset: the lowest that torch.onnx's ``torch.export``-based exporter emits natively
DEFAULT_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
METADATA_PREFIX = "vpt_lightning."

ImageLike = Union[Image.Image, os.PathLike, str]


class OnnxExportError(ValueError):
    """A model or request that cannot be exported to ONNX, or an export that does not match PyTorch."""


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not _importable(name)]
    if missing:
        raise ImportError(f'ONNX export needs {", ".join(missing)}: pip install "vpt-lightning[onnx]"')


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---- the eval transform -----------------------------------------------------------------------------------
def eval_transform_settings(
    eval_transform: Optional[Mapping[str, Any]], default_size: Optional[int] = None
) -> Dict[str, Any]:
    """The eval transform's settings with defaults filled in (those of ``vpt-predict``: the ``vtab`` recipe,
    ImageNet mean/std, bicubic, the backbone's input size ``default_size``)."""
    settings = dict(eval_transform or {})
    size = settings.get("img_size") or default_size
    if not size:
        raise OnnxExportError(
            "the input size is unknown: give an eval transform with 'img_size' (a DataModule's "
            "eval_transform_config()) or a model whose backbone has a data_config()"
        )
    return {
        "recipe": settings.get("recipe", "vtab"),
        "img_size": int(size),
        "interpolation": settings.get("interpolation", "bicubic"),
        "mean": [float(m) for m in settings.get("mean", IMAGENET_MEAN)],
        "std": [float(s) for s in settings.get("std", IMAGENET_STD)],
    }


def _saved(model: nn.Module, key: str) -> Any:
    """``model.<key>`` (a task model's attribute), else ``model.hparams[key]`` (a ``VPTModule``'s), else ``None``."""
    value = getattr(model, key, None)
    if value is None:
        value = (getattr(model, "hparams", None) or {}).get(key)
    return value


def saved_eval_transform(model: nn.Module) -> Optional[Mapping[str, Any]]:
    """The eval transform settings saved with a task (``model.eval_transform`` or ``hparams['eval_transform']``,
    a mapping of :func:`~vpt_lightning.data.transforms.build_transform` arguments; ``None`` when it has none)."""
    for source in (
        getattr(model, "eval_transform", None),
        (getattr(model, "hparams", None) or {}).get("eval_transform"),
    ):
        if source is not None:
            return plain_mapping(source)
    return None


def saved_class_names(model: nn.Module) -> Optional[Sequence[str]]:
    """The class names saved with a task (``model.class_names`` or ``hparams['class_names']``)."""
    return _saved(model, "class_names")


def model_input_size(model: nn.Module) -> Optional[int]:
    """The backbone's square input size from its timm data config, when the model has one (``model.backbone``)."""
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "data_config"):
        return int(backbone.data_config()["input_size"][-1])
    return None


def image_transform(
    eval_transform: Optional[Mapping[str, Any]], default_size: Optional[int] = None
) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform of a task as a function of an RGB PIL image (its settings filled in by
    :func:`eval_transform_settings`): what ``vpt-predict``, ``vpt-serve``, ``TaskModel.predict`` and ONNX inputs
    are prepared with."""
    settings = eval_transform_settings(eval_transform, default_size)
    return build_transform(
        settings["recipe"],
        train=False,
        img_size=settings["img_size"],
        mean=settings["mean"],
        std=settings["std"],
        interpolation=settings["interpolation"],
    )


def prepare_images(
    images: Sequence[ImageLike], eval_transform: Mapping[str, Any], default_size: Optional[int] = None
) -> torch.Tensor:
    """Load image files (or take PIL images), convert to RGB and apply the eval transform
    (:func:`image_transform`): ``(n, 3, size, size)``."""
    if not images:
        raise OnnxExportError("no images to prepare")
    transform = image_transform(eval_transform, default_size)
    tensors = []
    for image in images:
        if isinstance(image, Image.Image):
            tensors.append(transform(image.convert("RGB")))
        else:
            with Image.open(image) as opened:
                tensors.append(transform(opened.convert("RGB")))
    return torch.stack(tensors)


def random_images(count: int, size: int, seed: int = 0) -> List[Image.Image]:
    """``count`` random RGB images of ``size`` x ``size`` pixels (for checking an export when no images are given)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode, its former train/eval modes restored afterwards (module by module)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


# ---- export -----------------------------------------------------------------------------------------------
def _check_exportable(model: nn.Module) -> None:
    if getattr(model, "inputs_are_features", False):
        raise OnnxExportError(
            "the model is set to take cached backbone features (inputs_are_features=True), not images; "
            "set model.inputs_are_features = False to export images -> logits"
        )
    if getattr(model, "_compiled_backbone", None) is not None:
        raise OnnxExportError(
            "the model was built with compile=True; export the uncompiled model (rebuild or load it with compile=False)"
        )


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    eval_transform: Optional[Mapping[str, Any]] = None,
    class_names: Optional[Sequence[str]] = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``model`` (images -> logits) to an ONNX file at ``path`` with a dynamic batch axis; returns the path.

    Args:
        model: a module whose ``forward(images)`` returns ``(batch, num_classes)`` logits: a ``VPTModule``, a
            task model, or any ``nn.Module`` doing so. It is exported in eval mode (its modes are restored afterwards).
        path: the ``.onnx`` file written (atomically).
        eval_transform: the task's eval transform settings (``recipe``, ``img_size``, ``interpolation``,
            ``mean``, ``std``: a DataModule's ``eval_transform_config()``); default the task's saved one
            (:func:`saved_eval_transform`), else the backbone's input size with ImageNet mean/std.
        class_names: the class names stored in the metadata; default the task's (:func:`saved_class_names`).
        opset: the ONNX opset (default 18).
    """
    _require_onnx()
    import onnx

    _check_exportable(model)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise OnnxExportError(
            f"the model's weights are {sorted(map(str, dtypes))}; export a float32 model (model.float())"
        )
    settings = eval_transform_settings(
        eval_transform if eval_transform is not None else saved_eval_transform(model), model_input_size(model)
    )
    if class_names is None:
        class_names = saved_class_names(model)
    size = settings["img_size"]
    # two samples, not one: torch.export specialises a dimension of size 1, so the batch axis must start above it
    example = torch.zeros(2, 3, size, size, device=_model_device(model))
    with eval_mode(model), torch.no_grad():
        logits = model(example)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise OnnxExportError(
            f"{type(model).__name__}.forward(images) returned {shape}; ONNX export needs (batch, num_classes) logits"
        )
    if class_names is not None and len(class_names) != logits.shape[1]:
        raise OnnxExportError(f"{len(class_names)} class names for {logits.shape[1]} logits")
    batch = torch.export.Dim("batch", min=1)
    try:
        with eval_mode(model):
            program = torch.onnx.export(
                model,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
    except Exception as err:  # torch.export names the unsupported operation; keep its message
        raise OnnxExportError(f"torch.onnx.export failed for {type(model).__name__}: {err}") from err
    proto = program.model_proto
    metadata = {"eval_transform": settings, "num_classes": int(logits.shape[1])}
    if class_names is not None:
        metadata["class_names"] = [str(c) for c in class_names]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, json.dumps(value)
    onnx.checker.check_model(proto)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The vpt-lightning metadata of an exported file (``eval_transform``, ``class_names``, ``num_classes``)."""
    _require_onnx()
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {
        entry.key[len(METADATA_PREFIX) :]: json.loads(entry.value)
        for entry in proto.metadata_props
        if entry.key.startswith(METADATA_PREFIX)
    }


# ---- check ------------------------------------------------------------------------------------------------
def onnx_logits(path: Union[str, os.PathLike], images: torch.Tensor) -> np.ndarray:
    """Logits of prepared ``images`` computed by onnxruntime (CPU) from the exported file."""
    _require_onnx()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images.detach().cpu().float().numpy()})[0]


def check_onnx(model: nn.Module, path: Union[str, os.PathLike], images: torch.Tensor) -> float:
    """The largest absolute logit difference between onnxruntime (the exported file) and PyTorch (``model`` in
    eval mode, fp32) on prepared ``images`` (``(n, 3, size, size)``, e.g. from :func:`prepare_images`)."""
    if images.dim() != 4:
        raise OnnxExportError(f"images must be a (batch, 3, size, size) tensor, got shape {tuple(images.shape)}")
    with eval_mode(model), torch.no_grad():
        expected = model(images.detach().float().to(_model_device(model))).float().cpu().numpy()
    actual = onnx_logits(path, images)
    if actual.shape != expected.shape:
        raise OnnxExportError(f"onnxruntime returned logits of shape {actual.shape}, PyTorch {expected.shape}")
    return float(np.abs(actual - expected).max())
