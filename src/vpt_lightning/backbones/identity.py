"""The identity of a frozen backbone: which weights and architecture a task was trained on.

Every task (checkpoint or package) records it, so that it is only ever applied to the same backbone: the weights
fingerprint, width, depth and architecture decide; the timm name, weights source and file hash are information.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from .registry import family_class_of_model

# timm.create_model arguments that only act while training, so they are no part of the backbone's identity
TRAINING_ONLY_KWARGS = frozenset(
    {"drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"}
)


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
    rates left out) and the family's settings that leave no trace in the weight names and shapes."""
    return {
        "kwargs": {k: v for k, v in sorted(kwargs.items()) if k not in TRAINING_ONLY_KWARGS},
        **family_class_of_model(model).architecture(model),
    }


def backbone_identity(
    model: nn.Module,
    name: str,
    kwargs: Mapping[str, Any],
    weights: str,
    checkpoint_path: Optional[os.PathLike] = None,
) -> Dict[str, Any]:
    """The identity stored in every task checkpoint: fingerprint, width, depth and architecture decide; the timm
    name, the weights source (``hub``, ``file``, ``random(seed=k)``) and the file's SHA-256 are information."""
    identity: Dict[str, Any] = {"name": name, "kwargs": dict(kwargs), "weights": weights}
    if checkpoint_path:
        identity["checkpoint_sha256"] = file_sha256(Path(checkpoint_path).expanduser())
    identity.update(
        embed_dim=int(getattr(model, "embed_dim", getattr(model, "num_features", 0))),
        depth=family_class_of_model(model).depth(model),
        architecture=architecture(model, kwargs),
        fingerprint=weights_fingerprint(model),
    )
    return identity


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """What differs between two identities (fingerprint, width, depth, architecture); empty when they match."""
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs current {current.get(k)!r}"
        for k in ("fingerprint", "embed_dim", "depth")
        if saved.get(k) != current.get(k)
    ]
    saved_arch, current_arch = saved.get("architecture") or {}, current.get("architecture") or {}
    diffs += [
        f"architecture.{k}: checkpoint {saved_arch.get(k)!r} vs current {current_arch.get(k)!r}"
        for k in sorted(set(saved_arch) | set(current_arch))
        if saved_arch.get(k) != current_arch.get(k)
    ]
    if not saved_arch:
        diffs.append("architecture: not recorded in the checkpoint (written by an older version)")
    return diffs


def check_backbone_identity(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise a ``ValueError`` naming the differences when a task checkpoint's backbone is not this one.

    The weights fingerprint, width, depth and architecture decide, so the same weights from another source (hub,
    a local file in another format, a random init saved to a file) are accepted; the name, weights source and
    file hash are shown in the error only as information.
    """
    diffs = identity_differences(saved, current)
    if diffs:
        info = [
            f"{k}: checkpoint {saved.get(k)!r}, current {current.get(k)!r}"
            for k in ("name", "weights", "checkpoint_sha256")
        ]
        raise ValueError(
            "this task checkpoint was trained on another backbone; load it with the same backbone weights and "
            f"architecture as in training. Differences: {'; '.join(diffs)}. For information: {'; '.join(info)}"
        )
