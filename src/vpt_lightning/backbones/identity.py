"""The identity of a frozen backbone: which weights and architecture a task was trained on.

Every task (checkpoint or package) records it, so that it is only ever applied to the same backbone: the SHA-256 of
every weight value (``weights_sha256``), the sampled weights fingerprint, width, depth and architecture decide; the
timm name, weights source and file hash are information.

Identities written before ``weights_sha256`` existed carry only the sampled fingerprint (~4,096 values per tensor),
which a file with every other value replaced keeps. Such an identity is accepted only where the backbone provably
holds the same weights without the digest: the same weights file (its recorded ``checkpoint_sha256``, a hash of the
whole file), the same seeded random init of the same timm name and kwargs, or timm's hub weights of the same name
(a download from timm's own source). Anything else is refused with the way out (see :func:`identity_differences`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .registry import family_class_of_model

# timm.create_model arguments that only act while training, so they are no part of the backbone's identity
TRAINING_ONLY_KWARGS = frozenset(
    {"drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"}
)
# values converted (and hashed) per chunk, so that an fp16 tensor of 1 GB is never held twice in float32
DIGEST_CHUNK = 1 << 24
# (file identity, resize flag, name, kwargs) -> the file's SHA-256 and the weights digest of the model it gave
_FILE_DIGESTS: Dict[Tuple[Any, ...], Dict[str, str]] = {}


def file_sha256(path: os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: os.PathLike) -> Tuple[Any, ...]:
    """What tells a file's content without reading it: resolved path, device, inode, size, modification and change
    times in ns (a file rewritten in place, even with its old size and ``mtime`` put back, gets another ``ctime``)."""
    resolved = Path(path).expanduser().resolve()
    st = resolved.stat()
    return (str(resolved), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of every value of the model's state dict, streamed tensor by tensor in state-dict order: each tensor's
    name and shape, then its values on the CPU, C-contiguous, as float32 (floating tensors, so the digest does not
    depend on the device or on a half-precision copy of the same weights) or in their own dtype (integer buffers)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().reshape(-1)
        dtype = torch.float32 if tensor.is_floating_point() else flat.dtype
        digest.update(str(dtype).encode())
        for start in range(0, flat.numel(), DIGEST_CHUNK):
            part = flat[start : start + DIGEST_CHUNK].to(device="cpu", dtype=dtype).contiguous()
            digest.update(part.numpy())
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module, values_per_tensor: int = 4096) -> str:
    """A cheap digest of a model's weights: names, shapes and an evenly strided sample of every tensor.

    The sample spans the whole tensor (every value of tensors up to ``values_per_tensor`` values), so another
    checkpoint, another random init or a fine-tuned copy gets another fingerprint. It is no proof of the weights:
    a file with every value but the sampled ones replaced keeps it, so identities also record
    :func:`weights_sha256`, which decides. Kept because older versions compare it.
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
    file_before: Optional[Tuple[Any, ...]] = None,
    resized: bool = False,
) -> Dict[str, Any]:
    """The identity stored in every task checkpoint: the digest of every weight value, fingerprint, width, depth and
    architecture decide; the timm name, the weights source (``hub``, ``file``, ``random(seed=k)``) and the file's
    SHA-256 are information.

    ``file_before``: the weights file's :func:`file_identity` taken before the model read it (``resized``: its
    embeddings were resampled to the model): the file's SHA-256 and the weights digest are then cached in this
    process under it with ``name`` and ``kwargs`` (what the file's state dict is a function of), so that a big
    backbone is hashed once per file version, not at each load; a file that changed meanwhile is not cached.
    """
    identity: Dict[str, Any] = {"name": name, "kwargs": dict(kwargs), "weights": weights}
    key = None
    if checkpoint_path and file_before is not None:
        key = (file_before, bool(resized), name, json.dumps(dict(kwargs), sort_keys=True, default=str))
    digests = _FILE_DIGESTS.get(key) if key is not None else None
    if digests is None:
        digests = {"checkpoint_sha256": file_sha256(Path(checkpoint_path).expanduser())} if checkpoint_path else {}
        digests["weights_sha256"] = weights_sha256(model)
        if key is not None and file_identity(checkpoint_path) == file_before:
            _FILE_DIGESTS[key] = digests
    if checkpoint_path:
        identity["checkpoint_sha256"] = digests["checkpoint_sha256"]
    identity.update(
        embed_dim=int(getattr(model, "embed_dim", getattr(model, "num_features", 0))),
        depth=family_class_of_model(model).depth(model),
        architecture=architecture(model, kwargs),
        fingerprint=weights_fingerprint(model),
        weights_sha256=digests["weights_sha256"],
    )
    return identity


def same_weights_without_digest(saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether ``current`` provably holds the weights of ``saved``, an identity of an older version that records no
    ``weights_sha256``: the same weights file (its ``checkpoint_sha256``, a hash of the whole file), the same seeded
    random init of the same timm name and kwargs, or timm's hub weights of the same name (timm's own source)."""
    if saved.get("checkpoint_sha256"):
        return saved["checkpoint_sha256"] == current.get("checkpoint_sha256")
    same_model = saved.get("name") == current.get("name") and saved.get("kwargs") == current.get("kwargs")
    source = saved.get("weights")
    if isinstance(source, str) and source.startswith("random("):
        return same_model and source == current.get("weights")
    return source == "hub" and current.get("weights") == "hub" and saved.get("name") == current.get("name")


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """What differs between two identities (weights digest, fingerprint, width, depth, architecture); empty when
    they match. An identity without ``weights_sha256`` (an older version's) matches only where
    :func:`same_weights_without_digest` holds."""
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs current {current.get(k)!r}"
        for k in ("weights_sha256", "fingerprint", "embed_dim", "depth")
        if saved.get(k) != current.get(k) and (k != "weights_sha256" or k in saved)
    ]
    if "weights_sha256" not in saved and not same_weights_without_digest(saved, current):
        diffs.append(
            "weights_sha256: not recorded (an identity of an older version, with a sampled fingerprint only, which a "
            "backbone with its other weights replaced keeps): such a task loads only on the same weights file (its "
            "checkpoint_sha256), the same seeded random init or timm's hub weights of the same name; load it so once "
            "and save it again (vpt-export hub) to record the digest"
        )
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

    The digest of every weight value, the fingerprint, width, depth and architecture decide, so the same weights
    from another source (hub, a local file in another format, a random init saved to a file) are accepted; the name,
    weights source and file hash are shown in the error only as information.
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
