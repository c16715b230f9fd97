"""Creating the frozen timm backbone (hub weights, a local checkpoint file, or random init) and its identity."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from .dataclass_config import DataclassConfig

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz")
NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")  # the array-name prefixes timm's .npz loader knows
NPZ_QUERY = re.compile(r"encoderblock(_0)?/MultiHeadDotProductAttention_\d/query/kernel$")  # block 0's query
# timm.create_model arguments that only act while training, so they are no part of the backbone's identity
TRAINING_ONLY_KWARGS = frozenset(
    {"drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"}
)


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
    """

    name: str = "vit_base_patch16_224.orig_in21k"
    pretrained: bool = False
    checkpoint_path: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    resize_embeddings: bool = False

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


def weights_fingerprint(model: nn.Module, values_per_tensor: int = 4096) -> str:
    """A cheap digest of a model's weights: names, shapes and an evenly strided sample of every tensor.

    The sample spans the whole tensor (every value of tensors up to ``values_per_tensor`` values), so another
    checkpoint, another random init or a fine-tuned copy gets another fingerprint, while ViT-H still takes well
    under a second. The sampled values are hashed exactly (on the CPU, as float32), so the fingerprint does not
    depend on the device.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        if tensor.is_floating_point():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // values_per_tensor)]
            digest.update(sample.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def architecture(model: nn.Module, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """What decides the backbone's function besides its weights: the ``timm.create_model`` kwargs (training-only
    rates left out) and settings read from the model that leave no trace in the weight names and shapes."""
    blocks = getattr(model, "blocks", None)
    block = blocks[0] if blocks is not None and len(blocks) else None
    patch_embed = getattr(model, "patch_embed", None)
    return {
        "kwargs": {k: v for k, v in sorted(kwargs.items()) if k not in TRAINING_ONLY_KWARGS},
        "class": type(model).__name__,
        "img_size": list(getattr(patch_embed, "img_size", None) or []),
        "num_heads": getattr(getattr(block, "attn", None), "num_heads", None),
        "act": type(getattr(getattr(block, "mlp", None), "act", None)).__name__,
        "num_prefix_tokens": getattr(model, "num_prefix_tokens", None),
        "no_embed_class": getattr(model, "no_embed_class", None),
        "global_pool": getattr(model, "global_pool", None),
    }


def _embedding_resizes(path: Path, resized: List[str], allow: bool) -> None:
    """Fail on a patch-size / grid change unless ``backbone.resize_embeddings``; then log what is resampled."""
    if not resized:
        return
    what = "; ".join(resized)
    if not allow:
        raise ValueError(
            f"backbone.checkpoint_path={str(path)!r} was made for another patch size or image size ({what}); set "
            "backbone.kwargs (patch_size, img_size) to the checkpoint's, or backbone.resize_embeddings=true to "
            "resample them to this model"
        )
    log.warning("backbone.checkpoint_path=%r: resampling to this model (resize_embeddings=true): %s", str(path), what)


def _read_state_dict(path: Path, model: nn.Module, resize: bool = False) -> Dict[str, torch.Tensor]:
    """Read a torch/safetensors checkpoint as a state dict in timm's ViT layout.

    timm's filter converts layouts (a linear patch embedding, MAE/DINO/CLIP key names) by returning views of the
    file's tensors, but resamples the patch embedding and position embedding to the model's patch size and grid
    as new tensors; those need ``resize`` (``backbone.resize_embeddings``).
    """
    try:
        state_dict = timm.models.load_state_dict(str(path), use_ema=False)
    except Exception as err:  # unpickling/format errors: say which file
        raise ValueError(f"backbone.checkpoint_path={str(path)!r} could not be read as a weights file: {err}") from err
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"backbone.checkpoint_path={str(path)!r} holds no state dict of tensors")
    state_dict = timm.models.clean_state_dict(state_dict)
    # timm's own converter: conv patch embed, position-embedding resize, MAE/DINO/CLIP key layouts. It may pop
    # keys from its argument: give it a copy, so that every tensor of the file stays alive for the check below.
    filtered = checkpoint_filter_fn(dict(state_dict), model)
    storages = {t.untyped_storage().data_ptr() for t in state_dict.values()}
    expected = model.state_dict()
    resized = []
    for key in ("patch_embed.proj.weight", "pos_embed"):
        value = filtered.get(key)
        if value is not None and key in expected and value.untyped_storage().data_ptr() not in storages:
            source = next((t for k, t in state_dict.items() if k == key or k.endswith("." + key)), None)
            shape = tuple(source.shape) if source is not None else "another shape"
            resized.append(f"{key}: file {shape} vs model {tuple(expected[key].shape)}")
    _embedding_resizes(path, resized, resize)
    return filtered


def _check_npz(path: Path, model: VisionTransformer, resize: bool) -> None:
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
            + "; ".join(problems) + "; check backbone.name and backbone.kwargs against the checkpoint"
        )
    resized = []
    patch = tuple(model.patch_embed.proj.weight.shape[-2:])
    if tuple(kernel[:2]) != patch:
        resized.append(f"embedding/kernel: file {tuple(kernel)} (patch {tuple(kernel[:2])}) vs model patch {patch}")
    if pos is not None and model.pos_embed is not None and tuple(pos) != tuple(model.pos_embed.shape):
        resized.append(f"{pos_key}: file {tuple(pos)} vs model {tuple(model.pos_embed.shape)}")
    _embedding_resizes(path, resized, resize)


def load_backbone_weights(model: nn.Module, checkpoint_path: os.PathLike, resize_embeddings: bool = False) -> None:
    """Load a local weights file into ``model``, failing clearly on any key or shape mismatch.

    Classifier keys (``head.*``) of the file are ignored when the model has no head of that shape, so an
    ImageNet classifier checkpoint loads into a ``num_classes=0`` backbone. A file made for another patch size
    or image size needs ``resize_embeddings`` (see :class:`BackboneConfig`).
    """
    path = Path(checkpoint_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone.checkpoint_path={str(path)!r} does not exist")
    if path.suffix == ".npz":  # the original Google (big_vision / jax) ViT checkpoints: timm's own loader
        if isinstance(model, VisionTransformer):
            _check_npz(path, model, resize_embeddings)
        try:
            model.load_pretrained(str(path))
        except KeyError as err:
            raise ValueError(f"backbone.checkpoint_path={str(path)!r} lacks array {err} for this model") from err
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"backbone.checkpoint_path={str(path)!r} could not be loaded into {type(model).__name__} by timm's "
                f".npz loader ({err}); check backbone.name and backbone.kwargs against the checkpoint"
            ) from err
        return
    state_dict = _read_state_dict(path, model, resize_embeddings)
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

    Returns ``(model, identity)``; ``identity`` (name, weight source, file hash, weights fingerprint, width,
    depth and architecture) is stored in every task checkpoint so that it is only loaded onto the same backbone
    (the fingerprint, width, depth and architecture decide; name, source and file hash are information).
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
        load_backbone_weights(model, config.checkpoint_path, config.resize_embeddings)
        identity["weights"] = "file"
        identity["checkpoint_sha256"] = file_sha256(Path(config.checkpoint_path).expanduser())
    elif use_hub:
        identity["weights"] = "hub"
    else:
        identity["weights"] = f"random(seed={config.init_seed})"
    identity.update(
        embed_dim=int(getattr(model, "embed_dim", getattr(model, "num_features", 0))),
        depth=len(getattr(model, "blocks", [])),
        architecture=architecture(model, config.kwargs),
        fingerprint=weights_fingerprint(model),
    )
    return model, identity
