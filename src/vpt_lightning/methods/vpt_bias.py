"""VPT + Bias: prompts plus every bias of the backbone, with a linear head (the official ``prompt+bias`` transfer).

Every backbone parameter whose name ends in ``bias`` trains (attention, MLP, LayerNorm, patch-embedding and final-norm
biases), as Bias (BitFit) does, together with the prompts of ``prompt=deep`` (default) or ``prompt=shallow``.
"""

from ..backbones.base import PromptedBackbone
from .base import TuningConfig, TuningMethod
from .bias import Bias
from .registry import register_method


@register_method
class VPTBias(TuningMethod):
    name = "vpt_bias"
    report_order = 32
    prompts = "some"
    trains_backbone = True
    paper_method = "vpt_bias"  # the official code trains it like VPT: SGD on the prompt lr grid

    @classmethod
    def apply(cls, backbone: PromptedBackbone, config: TuningConfig) -> None:
        Bias.apply(backbone, config)
