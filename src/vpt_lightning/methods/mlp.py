"""MLP-k: an MLP head of k linear layers (ReLU between) on the frozen backbone's pooled features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from torch import nn

from .base import TuningConfig, TuningMethod
from .registry import register_method


@dataclass
class MLPConfig(TuningConfig):
    """``tuning=mlp``: ``mlp_layers`` linear layers (>= 2); hidden width ``mlp_hidden`` (default: the feature width)."""

    method: str = "mlp"
    mlp_layers: int = 3
    mlp_hidden: Optional[int] = None

    def __post_init__(self) -> None:
        if self.mlp_layers < 2:
            raise ValueError(f"tuning.mlp_layers={self.mlp_layers} must be >= 2 for an MLP head")


@register_method
class MLP(TuningMethod):
    name = "mlp"
    report_order = 12
    label_option = "mlp_layers"
    Config = MLPConfig
    prompts = "none"
    head_only = True

    @classmethod
    def build_head(cls, in_features: int, num_classes: int, config: MLPConfig) -> nn.Module:  # type: ignore[override]
        hidden = config.mlp_hidden or in_features
        layers: List[nn.Module] = []
        width = in_features
        for _ in range(config.mlp_layers - 1):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
