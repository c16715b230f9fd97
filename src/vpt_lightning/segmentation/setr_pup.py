"""The SETR-PUP decoder (Zheng et al., CVPR 2021) as small modules: progressive upsampling heads on ViT feature maps.

Written after mmsegmentation's ``SETRUPHead`` and ``configs/setr/setr_vit-l_pup_*`` (read, not a dependency): each
head layer-normalises its input map over channels, then applies ``num_convs`` times [3x3 conv (no bias), BatchNorm,
ReLU, ``up_scale``x bilinear upsampling], then a 1x1 classifier. The decode head reads the last tapped block with
4 convs and 2x steps (16x = the patch size of ViT-L/16); the auxiliary heads read the earlier taps with 2 convs and
4x steps, and their losses are weighted 0.4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import nn

from ..dataclass_config import DataclassConfig


class SETRUpHead(nn.Module):
    """LayerNorm over channels, ``num_convs`` x [conv-BN-ReLU, ``up_scale``x bilinear up], a 1x1 classifier.

    Args:
        in_channels: channels of the input map (the ViT width).
        num_classes: output channels (logits).
        channels: width of the convs (256 in SETR).
        num_convs: conv + upsampling steps.
        up_scale: upsampling factor of each step.
        kernel_size: conv kernel (3 in SETR-PUP).
        dropout: dropout before the classifier (0 in SETR-PUP).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 4,
        up_scale: int = 2,
        kernel_size: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_convs < 1 or up_scale < 1:
            raise ValueError(f"SETRUpHead needs num_convs >= 1 and up_scale >= 1, got {num_convs}, {up_scale}")
        self.norm = nn.LayerNorm(in_channels, eps=1e-6)
        layers: List[nn.Module] = []
        width = in_channels
        for _ in range(num_convs):
            layers += [
                nn.Conv2d(width, channels, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.Upsample(scale_factor=up_scale, mode="bilinear", align_corners=False),
            ]
            width = channels
        self.up_convs = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.classifier(self.dropout(self.up_convs(x)))


@dataclass
class SETRPUPConfig(DataclassConfig):
    """The ``segmentation.head`` options of the SETR-PUP decoder.

    Attributes:
        channels: conv width of every head (256 in SETR).
        decode_convs: conv + 2x steps of the decode head; ``None``: log2(patch size) (4 for patch 16).
        aux_convs: conv steps of each auxiliary head (2 in SETR); their factor is patch ** (1 / aux_convs).
        aux_weight: loss weight of each auxiliary head (0.4 in SETR).
        dropout: dropout before each classifier.
    """

    channels: int = 256
    decode_convs: int | None = None
    aux_convs: int = 2
    aux_weight: float = 0.4
    dropout: float = 0.0

    group = "segmentation.head"


def up_steps(patch: int, convs: int | None) -> Tuple[int, int]:
    """``(num_convs, up_scale)`` whose total upsampling is exactly ``patch``; ``convs=None``: 2x steps."""
    if convs is None:
        convs = int(round(math.log2(patch)))
        if 2**convs != patch:
            raise ValueError(f"patch size {patch} is not a power of 2: set segmentation.head.decode_convs")
        return convs, 2
    scale = int(round(patch ** (1.0 / convs)))
    if convs < 1 or scale**convs != patch:
        raise ValueError(f"{convs} upsampling steps cannot make patch size {patch} (need an integer factor per step)")
    return convs, scale


class SETRPUP(nn.Module):
    """The decode head on the last tapped map and one auxiliary head per earlier tapped map.

    ``forward(maps)`` -> ``(logits, aux_logits)``: the decode head's logits at ``patch`` x the map size and a list
    of the auxiliary heads' logits (same size), in the order of ``maps``.
    """

    def __init__(self, in_channels: int, num_classes: int, num_maps: int, patch: int, config: SETRPUPConfig) -> None:
        super().__init__()
        convs, scale = up_steps(patch, config.decode_convs)
        self.decode = SETRUpHead(in_channels, num_classes, config.channels, convs, scale, dropout=config.dropout)
        aux_convs, aux_scale = up_steps(patch, config.aux_convs)
        self.aux = nn.ModuleList(
            SETRUpHead(in_channels, num_classes, config.channels, aux_convs, aux_scale, dropout=config.dropout)
            for _ in range(num_maps - 1)
        )
        self.aux_weight = config.aux_weight

    def forward(self, maps: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if len(maps) != len(self.aux) + 1:
            raise ValueError(f"SETRPUP expects {len(self.aux) + 1} feature maps, got {len(maps)}")
        return self.decode(maps[-1]), [head(x) for head, x in zip(self.aux, maps[:-1])]
