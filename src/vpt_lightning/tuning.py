"""What a tuning strategy trains besides the prompts: the rows of the paper's comparison (spec §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from torch import nn

from .dataclass_config import DataclassConfig

BACKBONE_MODES = ("frozen", "full", "bias", "last_blocks")
HEADS = ("linear", "mlp")


@dataclass
class TuningConfig(DataclassConfig):
    """The ``tuning`` config node.

    Attributes:
        name: label of the strategy in logs and reports (``vpt_deep``, ``linear``, ``full``...).
        backbone: which backbone weights train: ``frozen`` (VPT, linear probe, MLP head), ``full`` (full
            fine-tuning), ``bias`` (BitFit: every bias), ``last_blocks`` (Partial-k: the last k blocks and the
            final norm).
        last_blocks: k for ``backbone='last_blocks'``.
        head: ``linear`` or ``mlp`` (MLP-k: ``mlp_layers`` linear layers with ReLU between).
        mlp_layers: number of linear layers of the MLP head (>= 2).
        mlp_hidden: hidden width of the MLP head (default: the feature width).
    """

    name: str = "vpt_deep"
    backbone: str = "frozen"
    last_blocks: int = 0
    head: str = "linear"
    mlp_layers: int = 2
    mlp_hidden: Optional[int] = None

    group = "tuning"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_MODES:
            raise ValueError(f"tuning.backbone={self.backbone!r} is not one of {list(BACKBONE_MODES)}")
        if self.head not in HEADS:
            raise ValueError(f"tuning.head={self.head!r} is not one of {list(HEADS)}")
        if self.backbone == "last_blocks" and self.last_blocks < 1:
            raise ValueError(f"tuning.last_blocks={self.last_blocks} must be >= 1 with tuning.backbone='last_blocks'")
        if self.head == "mlp" and self.mlp_layers < 2:
            raise ValueError(f"tuning.mlp_layers={self.mlp_layers} must be >= 2 for an MLP head")



def unfreeze_backbone(vit: nn.Module, config: TuningConfig) -> None:
    """Set ``requires_grad`` on the backbone weights that ``config`` trains (all others stay frozen)."""
    if config.backbone == "full":
        vit.requires_grad_(True)
    elif config.backbone == "bias":
        for name, param in vit.named_parameters():
            param.requires_grad_(name.endswith("bias"))
    elif config.backbone == "last_blocks":
        blocks = vit.blocks
        if config.last_blocks > len(blocks):
            raise ValueError(f"tuning.last_blocks={config.last_blocks} exceeds the backbone's {len(blocks)} blocks")
        for block in blocks[len(blocks) - config.last_blocks :]:
            block.requires_grad_(True)
        for name in ("norm", "fc_norm"):
            getattr(vit, name).requires_grad_(True)


def build_head(in_features: int, num_classes: int, config: TuningConfig) -> nn.Module:
    """A linear classifier, or an MLP of ``mlp_layers`` layers (ReLU between) for MLP-k."""
    if config.head == "linear":
        return nn.Linear(in_features, num_classes)
    hidden = config.mlp_hidden or in_features
    layers: List[nn.Module] = []
    width = in_features
    for _ in range(config.mlp_layers - 1):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
