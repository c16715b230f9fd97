"""The ConvNet family: ``PromptedConvNet``, a timm ConvNeXt or ResNet whose prompt is a learnable pixel border.

VPT on ConvNets (paper §4.4, Table 5; official resnet.py): the prompt is ``p`` learnable pixels padded around
each side of the input image, so a 224 px image enters the network at 224 + 2p px: a
:class:`~vpt_lightning.backbones.pixel_border.PixelBorder`, the same module as the ViT location ``pad`` (pixels in
[0, 1] image space, normalised like the images). The input is the only place a ConvNet takes prompts.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from timm.models.convnext import ConvNeXt
from timm.models.resnet import ResNet
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..prompt import PromptConfig
from .base import PromptedBackbone
from .pixel_border import PixelBorder
from .registry import register_family


def _stage_blocks(model: nn.Module) -> List[nn.Module]:
    """The residual blocks of a ConvNeXt (``stages[i].blocks``) or ResNet (``layer1..4``) in forward order."""
    if isinstance(model, ConvNeXt):
        return [block for stage in model.stages for block in stage.blocks]
    return [block for name in ("layer1", "layer2", "layer3", "layer4") for block in getattr(model, name, [])]


# vpt-tune for VPT on ConvNets: the paper's border widths, and the official `tune_vtab.py --train-type prompt_resnet`
# learning rates (the weight decays are the default ones)
BORDER_PIXELS = (1, 3, 5, 7, 9, 11)
PROMPT_LRS = (0.05, 0.025, 0.01, 0.5, 0.25, 0.1, 1.0, 2.5, 5.0)


@register_family(ConvNeXt, ResNet)
class PromptedConvNet(PromptedBackbone):
    """Wrap a timm ``ConvNeXt`` or ``ResNet``; its prompt is a :class:`PixelBorder` of ``prompt.num_tokens`` px.

    The forward pass is the model's own: border -> ``forward_features`` -> ``forward_head`` (ResNet: global
    average pool; ConvNeXt: average pool, then the final LayerNorm ``head.norm``, as the official ``norm(mean)``).

    Prompt config on a ConvNet: ``num_tokens`` is p, the border's width in pixels per side (the paper's grid is
    1, 3, 5, 7, 9, 11); the border may be at most half the image's side. The input is the only prompt location,
    so ``deep`` changes nothing (``tuning=vpt_deep`` and ``vpt_shallow`` both learn the input border; ``depth``
    may only name the input: null, 0, 1 for deep, [0]). The official ConvNet prompts have no dropout, projection
    or other location, so ``dropout`` > 0, ``project`` and ``location=add`` are refused. ``init``: the default
    (``xavier_uniform``, the ViT name of "the official init") is U(0, 1) pixels; ``zeros`` is a black border.

    BatchNorm: with ``backbone_eval`` (VPT, linear probe) the whole model runs in eval mode. When the backbone
    trains (``backbone_eval=false``: full, partial, bias tuning), a BatchNorm layer runs in train mode (batch
    statistics, running statistics updated) only while its scale trains (full fine-tuning, Partial-k's blocks),
    as in the official code, where the frozen part of the network stays in eval mode; frozen layers and those
    whose bias alone trains (BitFit) keep their running statistics.

    ``vpt-tune`` sweeps p over :data:`BORDER_PIXELS` and the learning rates of :data:`PROMPT_LRS` for VPT on a
    ConvNet (:attr:`prompt_grid`); the baselines keep ``conf/tune.yaml``'s grids.

    Args: as :class:`PromptedBackbone`.
    """

    prompt_grid = {"num_tokens": BORDER_PIXELS, "base_lr": PROMPT_LRS}

    def __init__(
        self,
        model: nn.Module,
        prompt: Union[PromptConfig, Mapping[str, Any], None] = None,
        freeze_backbone: bool = True,
        backbone_eval: bool = True,
    ) -> None:
        super().__init__(model, prompt, freeze_backbone=freeze_backbone, backbone_eval=backbone_eval)
        self.border: Optional[PixelBorder] = None
        if self.prompt_config.enabled:
            image_size = tuple(int(v) for v in self.data_config()["input_size"])
            check_border_config(self.prompt_config, image_size)
            init = "zeros" if self.prompt_config.init == "zeros" else "uniform"
            self.border = PixelBorder(self.prompt_config.num_tokens, image_size, init=init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (normalised) -> the border padded around them -> the model's ``forward_features``."""
        if self.border is not None:
            x = self.border(x)
        return self.model.forward_features(x)

    def train(self, mode: bool = True) -> "PromptedConvNet":
        super().train(mode)
        if mode and not self.backbone_eval:
            for module in self.model.modules():
                if isinstance(module, _BatchNorm) and not (module.weight is not None and module.weight.requires_grad):
                    module.eval()  # frozen (or bias-only) BatchNorm keeps its running statistics
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.model.set_grad_checkpointing(enable)  # timm's own per-stage / per-block checkpointing

    def blocks(self) -> List[nn.Module]:
        """The residual blocks of every stage in forward order (ConvNeXt's downsample layers are not blocks)."""
        return _stage_blocks(self.model)

    def final_norms(self) -> List[nn.Module]:
        """ConvNeXt: the final LayerNorm (``head.norm``, or ``norm_pre`` in head-norm-first models); ResNet: none."""
        if not isinstance(self.model, ConvNeXt):
            return []
        norms = [self.model.norm_pre, getattr(self.model.head, "norm", None)]
        return [m for m in norms if isinstance(m, nn.Module) and any(True for _ in m.parameters())]

    # ---- weight files and identity ----------------------------------------------------------------------
    @classmethod
    def filter_state_dict(cls, state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
        """timm's filter (ConvNeXt: the original FB layout), then two things timm's loader does for these files:
        the classifier (``pretrained_cfg['classifier']``: ``fc`` / ``head.fc``) is dropped when the model has none,
        and BatchNorm's ``num_batches_tracked`` is taken from the model when an old file (torchvision V1) lacks it."""
        state_dict = super().filter_state_dict(state_dict, model)
        expected = model.state_dict()
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        if classifier:
            state_dict = {k: v for k, v in state_dict.items() if k in expected or not k.startswith(f"{classifier}.")}
        for key, value in expected.items():
            if key.endswith(".num_batches_tracked") and key not in state_dict:
                state_dict[key] = value
        return state_dict

    @classmethod
    def depth(cls, model: nn.Module) -> int:
        return len(_stage_blocks(model))

    @classmethod
    def architecture(cls, model: nn.Module) -> Dict[str, Any]:
        if isinstance(model, ConvNeXt):
            pool = model.head.global_pool
            first = model.stages[0].blocks[0] if len(model.stages[0].blocks) else None
            act = type(getattr(getattr(first, "mlp", None), "act", None)).__name__
        else:
            pool, act = model.global_pool, type(model.act1).__name__
        return {"class": type(model).__name__, "global_pool": getattr(pool, "pool_type", None), "act": act}


def check_border_config(prompt: PromptConfig, image_size: Tuple[int, ...]) -> None:
    """Refuse prompt options a pixel border does not have, and a border wider than half the image."""
    p, side = prompt.num_tokens, min(image_size[1:])
    if 2 * p > side:
        raise ValueError(
            f"prompt.num_tokens={p} is the border's width in pixels per side on a ConvNet; 2 x {p} exceeds the "
            f"{image_size[1]}x{image_size[2]} image (at most {side // 2}; the paper's grid is 1, 3, 5, 7, 9, 11)"
        )
    if prompt.location != "prepend":
        raise ValueError(
            f"prompt.location={prompt.location!r}: ConvNet prompts are a pixel border around the input "
            "(use the default location)"
        )
    if prompt.project > 0:
        raise ValueError(f"prompt.project={prompt.project}: ConvNet prompts are pixels, without a projection (use -1)")
    if prompt.dropout > 0:
        raise ValueError(
            f"prompt.dropout={prompt.dropout}: the ConvNet pixel border has no dropout (the paper's VPT on ConvNets); "
            "use tuning=vpt_shallow, or prompt.dropout=0"
        )
    depth = prompt.depth
    input_only = depth is None or depth == [0] or depth == (1 if prompt.deep else 0)
    if not input_only:
        raise ValueError(
            f"prompt.depth={depth!r}: a ConvNet takes prompts only at its input (the pixel border), so VPT-Deep "
            "has nothing more to prompt; use depth=null (tuning=vpt_shallow and vpt_deep both learn the border)"
        )
