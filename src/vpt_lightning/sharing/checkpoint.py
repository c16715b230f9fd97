"""Task checkpoints without Lightning: the trainable state, reading a task file, and the backbone's identity.

A task checkpoint holds only what a tuning method trained (prompts, head, and backbone weights where the method
trains them), the hyper-parameters that rebuild the model, and the identity of the frozen backbone it was trained
on, so that it is only ever applied to the same weights. ``VPTModule`` writes it through Lightning; a script or
server reads it with :func:`read_task_checkpoint` and checks it with :func:`check_backbone_identity`.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Union

import torch
from torch import nn

from ..backbones.identity import (  # noqa: F401  (re-exported: the identity lives with the backbones)
    TRAINING_ONLY_KWARGS,
    architecture,
    backbone_identity,
    check_backbone_identity,
    file_sha256,
    identity_differences,
    weights_fingerprint,
    weights_sha256,
)

IDENTITY_KEY = "vpt_backbone_identity"
# how to rebuild the head (vpt_lightning.heads), for heads other than the tuning method's
HEAD_KEY = "vpt_task_head"
# what weights-only unpickling names when a file asks for a class or function: "Unsupported global: GLOBAL exec"
REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


# ---- the trainable state --------------------------------------------------------------------------------
def trainable_state_keys(module: nn.Module, frozen: Optional[nn.Module] = None) -> List[str]:
    """State-dict keys of what ``module`` trains, in state-dict order.

    Parameters that require grad; buffers outside ``frozen`` (the wrapped backbone model); and buffers of backbone
    modules that own a trained parameter (e.g. BatchNorm statistics where the backbone trains in train mode).
    """
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    frozen_buffers = set()
    if frozen is not None:
        prefix = next(name for name, m in module.named_modules() if m is frozen)
        for mod_name, sub in frozen.named_modules():
            if not any(p.requires_grad for p in sub.parameters(recurse=False)):
                frozen_buffers |= {
                    ".".join(part for part in (prefix, mod_name, b) if part)
                    for b, _ in sub.named_buffers(recurse=False)
                }
    names |= {name for name, _ in module.named_buffers() if name not in frozen_buffers}
    return [k for k in module.state_dict() if k in names]


def trainable_state_dict(module: nn.Module, frozen: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """The tensors of :func:`trainable_state_keys`, detached."""
    state = module.state_dict()
    return {k: state[k].detach() for k in trainable_state_keys(module, frozen)}


# ---- reading a task checkpoint ----------------------------------------------------------------------------
@dataclass
class TaskCheckpoint:
    """What a task checkpoint file holds: the trained tensors, the hyper-parameters and the backbone identity."""

    path: Path
    state_dict: Dict[str, torch.Tensor]
    hparams: Dict[str, Any]
    identity: Optional[Dict[str, Any]]
    head: Optional[Dict[str, Any]] = None


def read_task_checkpoint(path: os.PathLike) -> TaskCheckpoint:
    """Read a task checkpoint (``last.ckpt`` of ``vpt-train``) on the CPU, without Lightning.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain values only, so a file carrying a
    pickled payload (code run on loading) is refused with a ``ValueError`` naming the file and what was refused,
    and the payload never runs. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file
    for one that is not a task checkpoint.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"task checkpoint {str(path)!r} does not exist")
    raw = load_weights_only(path)
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("state_dict"), dict)
        or not isinstance(raw.get("hyper_parameters"), dict)
    ):
        raise ValueError(
            f"{str(path)!r} is not a vpt-lightning task checkpoint (no 'state_dict' and 'hyper_parameters'); "
            "give a checkpoints/last.ckpt written by vpt-train or VPTModule"
        )
    return TaskCheckpoint(
        path, dict(raw["state_dict"]), dict(raw["hyper_parameters"]), raw.get(IDENTITY_KEY), raw.get(HEAD_KEY)
    )


def load_weights_only(path: Union[os.PathLike, IO[bytes]]) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (a path or an open binary file), with errors that name the
    file: what unpickling refused (a class or function outside torch's allow-list of tensors and plain containers),
    or why it is unreadable. ``weights_only=True`` is explicit: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot lift it."""
    path = Path(path) if isinstance(path, (str, os.PathLike)) else path
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = REFUSED_GLOBAL.search(str(err))
        if found:
            raise ValueError(
                f"{_name(path)!r} was refused: it asks to unpickle {found.group(1)!r}, which is not a tensor or plain "
                "value (read with torch.load(weights_only=True)); a task checkpoint never needs it, so the file was "
                "not loaded and nothing in it ran"
            ) from None
        reason = str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
        raise ValueError(f"{_name(path)!r} could not be read as a checkpoint: {reason}") from None
    except Exception as err:  # a truncated or foreign file: name it
        raise ValueError(f"{_name(path)!r} could not be read as a checkpoint: {err}") from err


def _name(source: Any) -> str:
    return str(source) if isinstance(source, Path) else str(getattr(source, "name", "the checkpoint"))
