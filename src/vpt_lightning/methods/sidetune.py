"""Sidetune (Zhang et al. 2020): a trainable AlexNet side network mixed with the frozen backbone's features.

As the official VPT code (``vit_models.py``): the side network is torchvision's AlexNet ``features`` + ``avgpool``
(6x6), flattened to 9216 values and projected to the backbone's feature width by a bias-free linear layer;
the head sees ``sigmoid(alpha) * backbone(x) + (1 - sigmoid(alpha)) * side(x)`` with the scalar ``alpha`` starting at
0. The AlexNet features, the projection, ``alpha`` and the head train; the backbone stays frozen.

``tuning.side_weights`` names the AlexNet start: ``random`` (PyTorch's init), a torchvision weights name
(``IMAGENET1K_V1``, the paper's, or ``DEFAULT``; downloaded once into torch's cache) or a local file of a torchvision
``alexnet`` state dict (``.pth``/``.pt``/``.safetensors``; the ``features.*`` tensors are read).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import PromptedBackbone
from .base import TuningConfig, TuningMethod
from .registry import register_method

SIDE_FEATURES = 256 * 6 * 6  # AlexNet features x its 6x6 average pool
MIN_SIZE = 63  # the smallest input AlexNet's features accept; smaller images are upsampled to it


@dataclass
class SidetuneConfig(TuningConfig):
    """``tuning=sidetune``: ``side_weights`` = ``random``, a torchvision ``AlexNet_Weights`` name or a local file."""

    method: str = "sidetune"
    side_weights: str = "IMAGENET1K_V1"


def load_alexnet_features(weights: str) -> Tuple[nn.Module, nn.Module]:
    """AlexNet's ``features`` and ``avgpool`` from torchvision, started as ``weights`` says (see the module doc)."""
    from torchvision.models import AlexNet_Weights, alexnet

    if weights == "random":
        model = alexnet(weights=None)
    elif weights in AlexNet_Weights.__members__:
        model = alexnet(weights=AlexNet_Weights[weights])
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ValueError(
                f"tuning.side_weights={weights!r} is neither 'random', a torchvision AlexNet_Weights name "
                f"{list(AlexNet_Weights.__members__)} nor an existing file"
            )
        model = alexnet(weights=None)
        state = _read_state_dict(path)
        features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        missing = sorted(set(model.features.state_dict()) - set(features))
        if missing:
            raise ValueError(
                f"tuning.side_weights={weights!r} lacks AlexNet tensors {['features.' + k for k in missing]}"
            )
        try:
            model.features.load_state_dict(features)
        except RuntimeError as err:
            raise ValueError(f"tuning.side_weights={weights!r} does not fit torchvision's alexnet: {err}") from None
    return model.features, model.avgpool


def _read_state_dict(path: Path) -> Dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else {}


class SideNetwork(nn.Module):
    """AlexNet features -> 6x6 average pool -> bias-free projection to ``out_features``; ``alpha`` gates the mix."""

    def __init__(self, out_features: int, weights: str = "random") -> None:
        super().__init__()
        self.features, self.avgpool = load_alexnet_features(weights)
        self.projection = nn.Linear(SIDE_FEATURES, out_features, bias=False)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if min(images.shape[-2:]) < MIN_SIZE:
            images = F.interpolate(images, size=(MIN_SIZE, MIN_SIZE), mode="bilinear", align_corners=False)
        return self.projection(torch.flatten(self.avgpool(self.features(images)), 1))

    def mix(self, backbone: nn.Module, inputs: Tuple[torch.Tensor, ...], features: torch.Tensor) -> torch.Tensor:
        """Forward hook of the backbone: ``sigmoid(alpha) * features + (1 - sigmoid(alpha)) * side(images)``."""
        gate = torch.sigmoid(self.alpha)
        return gate * features + (1 - gate) * self(inputs[0]).to(features.dtype)


@register_method
class Sidetune(TuningMethod):
    name = "sidetune"
    report_order = 20
    Config = SidetuneConfig
    prompts = "none"
    paper_method = "sidetune"

    @classmethod
    def config_for_saved_tensors(cls, config: SidetuneConfig) -> SidetuneConfig:  # type: ignore[override]
        """The side network trains entirely, so a saved task carries all of it: start it at random (no download)."""
        return dataclasses.replace(config, side_weights="random")

    @classmethod
    def apply(cls, backbone: PromptedBackbone, config: SidetuneConfig) -> None:  # type: ignore[override]
        backbone.side = SideNetwork(backbone.num_features, config.side_weights)
        backbone.register_forward_hook(backbone.side.mix)
