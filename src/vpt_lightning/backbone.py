"""Creating the frozen timm backbone (hub weights, a local checkpoint file, or random init) and its identity."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from .dataclass_config import DataclassConfig

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz")


@dataclass
class BackboneConfig(DataclassConfig):
    """The ``backbone`` config group.

    Attributes:
        name: a timm model name, with an optional pretrained tag (``vit_base_patch16_224.orig_in21k``).
        pretrained: load timm's hub weights for ``name`` (needs network or a filled HF cache).
        checkpoint_path: a local weights file instead: a timm/torch state dict (``.pth``/``.pt``/``.bin``, also
            wrapped in ``state_dict``/``model``), ``.safetensors``, or an original Google ViT ``.npz``.
        kwargs: extra ``timm.create_model`` arguments (``img_size``, ``patch_size``, ``depth``, ``drop_path_rate``...).
        init_seed: seed of the random init when neither ``pretrained`` nor ``checkpoint_path`` is given, so
            that a randomly initialised backbone is the same each time it is built.
    """

    name: str = "vit_base_patch16_224.orig_in21k"
    pretrained: bool = False
    checkpoint_path: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0

    group = "backbone"

    def __post_init__(self) -> None:
        self.kwargs = dict(self.kwargs or {})


def file_sha256(path: os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module, values_per_tensor: int = 2048) -> str:
    """A cheap digest of a model's weights: names, shapes and the first values of every tensor.

    Two backbones with different weights (another checkpoint, another random init) get different
    fingerprints; hashing only a prefix of each tensor keeps this fast for ViT-H.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        if tensor.is_floating_point():
            head = tensor.detach().reshape(-1)[:values_per_tensor].to(device="cpu", dtype=torch.float32)
            digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]


def _read_state_dict(path: Path, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Read a torch/safetensors checkpoint as a state dict in timm's ViT layout."""
    try:
        state_dict = timm.models.load_state_dict(str(path), use_ema=False)
    except Exception as err:  # unpickling/format errors: say which file
        raise ValueError(f"backbone.checkpoint_path={str(path)!r} could not be read as a weights file: {err}") from err
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"backbone.checkpoint_path={str(path)!r} holds no state dict of tensors")
    state_dict = timm.models.clean_state_dict(state_dict)
    # timm's own converter: conv patch embed, position-embedding resize, MAE/DINO/CLIP key layouts
    return checkpoint_filter_fn(state_dict, model)


def load_backbone_weights(model: nn.Module, checkpoint_path: os.PathLike) -> None:
    """Load a local weights file into ``model``, failing clearly on any key or shape mismatch.

    Classifier keys (``head.*``) of the file are ignored when the model has no head of that shape, so an
    ImageNet classifier checkpoint loads into a ``num_classes=0`` backbone.
    """
    path = Path(checkpoint_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone.checkpoint_path={str(path)!r} does not exist")
    if path.suffix == ".npz":  # the original Google (big_vision / jax) ViT checkpoints: timm's own loader
        try:
            model.load_pretrained(str(path))
        except KeyError as err:
            raise ValueError(f"backbone.checkpoint_path={str(path)!r} lacks array {err} for this model") from err
        return
    state_dict = _read_state_dict(path, model)
    expected = model.state_dict()
    head_keys = {k for k in state_dict if k.startswith("head.")}
    for key in head_keys:
        if key not in expected or expected[key].shape != state_dict[key].shape:
            del state_dict[key]
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state_dict) & set(expected))
        if state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        def show(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = [f"backbone.checkpoint_path={str(path)!r} does not fit model {type(model).__name__}"]
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {show(mismatched)}")
        parts.append("check backbone.name and backbone.kwargs against the checkpoint")
        raise ValueError("; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def create_backbone(config: BackboneConfig | Mapping[str, Any]) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the timm model named by ``config`` without a classifier, and describe its identity.

    Returns ``(model, identity)``; ``identity`` (name, weight source, file hash, weights fingerprint, width and
    depth) is stored in every task checkpoint so that it is only loaded onto the same backbone.
    """
    if not isinstance(config, BackboneConfig):
        config = BackboneConfig.from_mapping(config)
    kwargs = dict(config.kwargs)
    kwargs["num_classes"] = 0
    use_hub = config.pretrained and not config.checkpoint_path
    try:
        if use_hub or config.checkpoint_path:
            model = timm.create_model(config.name, pretrained=use_hub, **kwargs)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.init_seed)
                model = timm.create_model(config.name, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(
                f"backbone.name={config.name!r} is not a timm model; see timm.list_models('vit_*') for valid names"
            ) from err
        raise
    identity: Dict[str, Any] = {"name": config.name, "kwargs": dict(config.kwargs)}
    if config.checkpoint_path:
        load_backbone_weights(model, config.checkpoint_path)
        identity["weights"] = "file"
        identity["checkpoint_sha256"] = file_sha256(Path(config.checkpoint_path).expanduser())
    elif use_hub:
        identity["weights"] = "hub"
    else:
        identity["weights"] = f"random(seed={config.init_seed})"
    identity.update(
        embed_dim=int(getattr(model, "embed_dim", getattr(model, "num_features", 0))),
        depth=len(getattr(model, "blocks", [])),
        fingerprint=weights_fingerprint(model),
    )
    return model, identity
