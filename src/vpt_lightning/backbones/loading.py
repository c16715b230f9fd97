"""Creating the frozen timm backbone from hub weights, a local weights file, or a seeded random init."""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Type

import numpy as np
import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..dataclass_config import DataclassConfig
from ..protocol.paper import BACKBONES, backbone_key
from ..renamed import renamed_names
from .base import PromptedBackbone, refuse_resampling
from .identity import backbone_identity, file_identity
from .registry import family_class_of_model


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
        resize_embeddings: let a ``checkpoint_path`` made for another patch size or image size load, resampling
            its patch-embedding kernel and position embedding to this model (timm's resampling, logged as a
            warning). Off by default: such a file fails, naming the keys and shapes.
        reference: which of the paper's backbones this is, for ``vpt-report``'s paper columns (a key of
            :data:`vpt_lightning.protocol.paper.BACKBONES`, e.g. ``mocov3``); ``null``: found from ``name``.
    """

    name: str = "vit_base_patch16_224.orig_in21k"
    pretrained: bool = False
    checkpoint_path: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    resize_embeddings: bool = False
    reference: Optional[str] = None

    group = "backbone"

    def __post_init__(self) -> None:
        # plain containers: timm takes lists (Swin's depths), not OmegaConf's ListConfig
        self.kwargs = (
            OmegaConf.to_container(self.kwargs, resolve=True)
            if isinstance(self.kwargs, DictConfig)
            else dict(self.kwargs or {})
        )
        paper = backbone_key(self.name, self.reference)  # a reference the paper does not have is named
        if paper is not None and not BACKBONES[paper].timm_names and not self.checkpoint_path:
            raise ValueError(
                f"backbone.reference={paper!r}: timm has no weights for {BACKBONES[paper].label}; set "
                f"backbone.checkpoint_path to a local copy of {BACKBONES[paper].weights_url}"
            )


def _read_state_dict(path: Path, model: nn.Module, resize: bool = False) -> Dict[str, torch.Tensor]:
    """Read a torch/safetensors checkpoint as a state dict in the model's layout, through its family's timm filter.

    timm's filters convert layouts (e.g. a linear patch embedding, MAE/DINO/CLIP key names) by returning views of
    the file's tensors, but resample patch and position embeddings (the family's ``resampled_keys``) to the model
    (and Swin's relative position tables) as new tensors; those need ``resize`` (``backbone.resize_embeddings``).
    """
    try:
        # never unpickles code: torch.load(weights_only=True) (safetensors files are not pickles)
        state_dict = timm.models.load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as err:  # unpickling/format errors: say which file
        raise ValueError(f"backbone.checkpoint_path={str(path)!r} could not be read as a weights file: {err}") from err
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"backbone.checkpoint_path={str(path)!r} holds no state dict of tensors")
    state_dict = timm.models.clean_state_dict(state_dict)
    family = family_class_of_model(model)
    # the family's own timm converter may pop keys from its argument: give it a copy, so that every tensor of the
    # file stays alive for the check below
    try:
        filtered = family.filter_state_dict(dict(state_dict), model)
    except Exception as err:  # timm's filters assume a file of the model's layout (Swin's looks up every table)
        fitting_state_dict(path, model, state_dict)  # name the keys that do not fit, if that is why
        raise ValueError(
            f"backbone.checkpoint_path={str(path)!r} could not be converted for {type(model).__name__} by its timm "
            f"filter ({type(err).__name__}: {err}); check backbone.name and backbone.kwargs against the checkpoint"
        ) from err
    storages = {t.untyped_storage().data_ptr() for t in state_dict.values()}
    expected = model.state_dict()
    resized = []
    resampled = [k for k in filtered if any(k == r or k.endswith("." + r) for r in family.resampled_keys)]
    for key in resampled:
        value = filtered[key]
        if key in expected and value.untyped_storage().data_ptr() not in storages:
            source = next((t for k, t in state_dict.items() if k == key or k.endswith("." + key)), None)
            shape = tuple(source.shape) if source is not None else "another shape"
            resized.append(f"{key}: file {shape} vs model {tuple(expected[key].shape)}")
    # a file of another model fails naming its keys, before any resampling
    filtered = fitting_state_dict(path, model, filtered)
    refuse_resampling(path, resized, resize)
    return filtered


def fitting_state_dict(path: Path, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A new dict of ``state_dict`` without the classifier keys (``head.*``) that ``model`` lacks or holds in another
    shape; fails naming the missing, unexpected and mis-shaped keys when the rest does not fit ``model``.
    ``state_dict`` itself is left as it is."""
    expected = model.state_dict()
    state_dict = {
        k: v
        for k, v in state_dict.items()
        if not k.startswith("head.") or (k in expected and expected[k].shape == v.shape)
    }
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
    return state_dict


def load_backbone_weights(model: nn.Module, checkpoint_path: os.PathLike, resize_embeddings: bool = False) -> None:
    """Load a local weights file into ``model``, failing clearly on any key or shape mismatch.

    Classifier keys (``head.*``) of the file are ignored when the model has no head of that shape, so an
    ImageNet classifier checkpoint loads into a ``num_classes=0`` backbone. A file made for another patch size
    or image size needs ``resize_embeddings`` (see :class:`BackboneConfig`).
    """
    path = Path(checkpoint_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone.checkpoint_path={str(path)!r} does not exist")
    if family_class_of_model(model).load_special_file(model, path, resize_embeddings):  # e.g. ViT's .npz files
        return
    model.load_state_dict(_read_state_dict(path, model, resize_embeddings), strict=True)


@functools.lru_cache(maxsize=32)
def _family_class_of_architecture(name: str, kwargs_json: str) -> Type[PromptedBackbone]:
    """The family class of timm model ``name`` built with ``kwargs_json`` on the meta device (cached per pair)."""
    kwargs = {**json.loads(kwargs_json), "num_classes": 0}
    try:
        with torch.device("meta"):  # the architecture alone: no memory, no weights
            model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(
                f"backbone.name={name!r} is not a timm model; see timm.list_models() for valid names"
            ) from err
        model = timm.create_model(name, pretrained=False, **kwargs)  # an init that needs real tensors
    return family_class_of_model(model)


def create_architecture(config: BackboneConfig | Mapping[str, Any]) -> nn.Module:
    """The timm model a ``backbone`` config names, without a classifier and without weights (never a download or a
    file): built under ``torch.device("meta")``, it describes the architecture without allocating it."""
    config = BackboneConfig.parse(config)
    return timm.create_model(config.name, pretrained=False, **{**config.kwargs, "num_classes": 0})


def family_class_of_config(config: BackboneConfig | Mapping[str, Any]) -> Type[PromptedBackbone]:
    """The prompted-backbone family class of the model a ``backbone`` config builds, without building its weights."""
    config = BackboneConfig.parse(config)
    return _family_class_of_architecture(config.name, json.dumps(config.kwargs, sort_keys=True))


def create_backbone(config: BackboneConfig | Mapping[str, Any]) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the timm model named by ``config`` without a classifier, and describe its identity.

    Returns ``(model, identity)``; ``identity`` (name, weight source, file hash, the SHA-256 of every weight value,
    weights fingerprint, width, depth and architecture) is stored in every task checkpoint so that it is only loaded
    onto the same backbone (the weights digest, fingerprint, width, depth and architecture decide; name, source and
    file hash are information). The digests of a weights file's backbone are cached in this process by the file's
    identity (path, inode, size, mtime and ctime), so a second load of the same file does not hash it again.
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
                f"backbone.name={config.name!r} is not a timm model; see timm.list_models() for valid names"
            ) from err
        raise
    file_before = None
    if config.checkpoint_path:
        path = Path(config.checkpoint_path).expanduser()
        file_before = file_identity(path) if path.is_file() else None
        load_backbone_weights(model, config.checkpoint_path, config.resize_embeddings)
        weights = "file"
    else:
        weights = "hub" if use_hub else f"random(seed={config.init_seed})"
    identity = backbone_identity(
        model, config.name, config.kwargs, weights, config.checkpoint_path, file_before, config.resize_embeddings
    )
    return model, identity


# ---- the original Google ViT .npz files (read by timm's own loader, after this check) -------------------------
NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")  # the array-name prefixes timm's .npz loader knows
NPZ_QUERY = re.compile(r"encoderblock(_0)?/MultiHeadDotProductAttention_\d/query/kernel$")  # block 0's query


def check_npz(path: Path, model: nn.Module, resize: bool) -> None:
    """Compare an original Google ViT ``.npz`` with the model before timm's loader (which ignores extra blocks
    and resamples embeddings silently): blocks, width, heads, class token, patch size and position grid."""
    try:
        with np.load(path) as arrays:
            names = set(arrays.files)
            prefix = next((p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in names), "")
            pos_keys = [f"{prefix}Transformer/posembed_input/pos_embedding", f"{prefix}pos_embedding"]
            pos_key = next((k for k in pos_keys if k in names), None)
            query = sorted(k for k in names if NPZ_QUERY.search(k))
            stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"  # big_vision: blocks stacked on axis 0
            wanted = (f"{prefix}embedding/kernel", pos_key, stacked, *query[:1])
            shapes = {k: arrays[k].shape for k in wanted if k in names}
    except Exception as err:  # not a zip of arrays, pickled data...: say which file
        raise ValueError(f"backbone.checkpoint_path={str(path)!r} could not be read as an .npz file: {err}") from err
    kernel = shapes.get(f"{prefix}embedding/kernel")
    if kernel is None:
        raise ValueError(f"backbone.checkpoint_path={str(path)!r} lacks the array 'embedding/kernel' of a ViT .npz")
    pos = shapes.get(pos_key)
    heads = shapes[query[0]][-2] if query else None
    if stacked in shapes:
        depth = shapes[stacked][0]
    else:
        block = re.compile(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/")
        depth = len({m.group(1) for m in map(block.match, names) if m})
    problems = []
    if depth != len(model.blocks):
        problems.append(f"{depth} Transformer/encoderblock_* blocks vs model depth {len(model.blocks)}")
    if kernel[-1] != model.embed_dim:
        problems.append(f"embedding/kernel {tuple(kernel)} (width {kernel[-1]}) vs model embed_dim {model.embed_dim}")
    num_heads = getattr(model.blocks[0].attn, "num_heads", None) if len(model.blocks) else None
    if heads is not None and num_heads is not None and heads != num_heads:
        problems.append(f"{query[0]} {heads} heads vs model num_heads {num_heads}")
    if (f"{prefix}cls" in names) != (model.cls_token is not None):
        has = "has" if f"{prefix}cls" in names else "lacks"
        problems.append(f"file {has} a class token ('cls') vs model class_token={model.cls_token is not None}")
    if pos is None and model.pos_embed is not None:
        problems.append("file lacks the position embedding 'Transformer/posembed_input/pos_embedding'")
    if problems:
        raise ValueError(
            f"backbone.checkpoint_path={str(path)!r} does not fit model {type(model).__name__}: "
            + "; ".join(problems)
            + "; check backbone.name and backbone.kwargs against the checkpoint"
        )
    resized = []
    patch = tuple(model.patch_embed.proj.weight.shape[-2:])
    if tuple(kernel[:2]) != patch:
        resized.append(f"embedding/kernel: file {tuple(kernel)} (patch {tuple(kernel[:2])}) vs model patch {patch}")
    if pos is not None and model.pos_embed is not None and tuple(pos) != tuple(model.pos_embed.shape):
        resized.append(f"{pos_key}: file {tuple(pos)} vs model {tuple(model.pos_embed.shape)}")
    refuse_resampling(path, resized, resize)


__getattr__ = renamed_names(__name__, {"family_of_config": family_class_of_config})
