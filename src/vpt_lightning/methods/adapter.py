"""Adapter (Pfeiffer style): a bottleneck after each block's MLP, ``m + W_up GELU(W_down m + b_down) + b_up``.

Only the adapters and the head train; the backbone stays frozen. ``tuning.init`` chooses the start:

- ``learn`` (default): ``W_down`` random (PyTorch's Linear init), ``W_up`` and ``b_up`` zero, so every adapter starts
  as the identity and all four tensors learn;
- ``official``: all four tensors zero, as the official ``vit_adapter/vit.py``. Then GELU(0) = 0 and
  ``W_up = 0`` keep the gradients of ``W_down``, ``b_down`` and ``W_up`` at exactly 0: only ``b_up`` ever learns, and
  the adapter is one learnable bias vector after each MLP. Use it to reproduce the paper's Adapter rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.base import PromptedBackbone
from ..dataclass_config import number
from .base import AdamWRecipe, TuningConfig
from .registry import register_method

INITS = ("learn", "official")


@dataclass
class AdapterConfig(TuningConfig):
    """``tuning=adapter``: hidden width = block width / ``reduction`` (the paper: 8, 64, 256); ``init``: ``learn`` or
    ``official`` (all zero, as the official code: only the up-projection bias learns)."""

    method: str = "adapter"
    reduction: int = 8
    init: str = "learn"

    def __post_init__(self) -> None:
        self.reduction = number(
            "tuning.reduction",
            self.reduction,
            "an integer >= 1 (the paper: 8, 64, 256)",
            lambda v: v >= 1,
            integer=True,
        )
        if self.init not in INITS:
            raise ValueError(f"tuning.init={self.init!r} is not one of {list(INITS)}")


class Adapter(nn.Module):
    """The bottleneck ``up(GELU(down(x)))`` (exact GELU) of width ``dim // reduction``."""

    def __init__(self, dim: int, reduction: int, init: str = "learn") -> None:
        super().__init__()
        hidden = dim // reduction
        if hidden < 1:
            raise ValueError(f"tuning.reduction={reduction} leaves no hidden unit for a block of width {dim}")
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        zeroed = [self.up.weight, self.up.bias] + ([self.down.weight, self.down.bias] if init == "official" else [])
        with torch.no_grad():
            for tensor in zeroed:
                tensor.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class AdaptedMLP(nn.Module):
    """A block's MLP followed by its adapter: ``m = mlp(x); return m + adapter(m)`` (before the block's residual)."""

    def __init__(self, mlp: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp(x)
        return m + self.adapter(m)


def mlp_width(block: nn.Module) -> int:
    """The output width of a block's MLP (timm's ``Mlp``: ``fc2``), or a ``ValueError`` for blocks without one."""
    fc2 = getattr(getattr(block, "mlp", None), "fc2", None)
    if not isinstance(fc2, nn.Linear):
        raise ValueError(
            f"tuning=adapter needs blocks with a timm Mlp (block.mlp.fc2); {type(block).__name__} has none"
        )
    return fc2.out_features


@register_method
class AdapterMethod(AdamWRecipe):
    name = "adapter"
    report_order = 22
    Config = AdapterConfig
    prompts = "none"
    paper_method = "adapter"
    label_option = "reduction"

    @classmethod
    def apply(cls, backbone: PromptedBackbone, config: AdapterConfig) -> None:  # type: ignore[override]
        for block in backbone.blocks():
            adapter = Adapter(mlp_width(block), config.reduction, config.init)
            adapter.to(device=block.mlp.fc2.weight.device, dtype=block.mlp.fc2.weight.dtype)
            block.mlp = AdaptedMLP(block.mlp, adapter)
