"""LoRA through HuggingFace ``peft``: low-rank updates ``(alpha / r) B A`` on the backbone's linear layers.

``peft``'s ``inject_adapter_in_model`` replaces each targeted ``nn.Linear`` of the timm model (default: every block's
attention ``qkv``) by its LoRA layer (``base_layer`` + ``lora_A`` + ``lora_B``; ``B`` starts at zero, so training starts
from the backbone's function). The backbone's identity is taken before, from its own weights; a task checkpoint
holds the LoRA tensors and the head, and reloads onto the same backbone. Needs the ``lora`` extra
(``pip install 'vpt-lightning[lora]'``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from torch import nn

from ..backbones.base import PromptedBackbone
from ..dataclass_config import number
from .base import AdamWRecipe, TuningConfig
from .registry import register_method


@dataclass
class LoRAConfig(TuningConfig):
    """``tuning=lora``: ``rank`` r >= 1, ``alpha`` (the update is scaled by alpha / r), ``target_modules`` (peft's
    names: module-name suffixes of the timm model, default the attention ``qkv``), ``dropout`` on the LoRA input."""

    method: str = "lora"
    rank: int = 8
    alpha: float = 8.0
    target_modules: List[str] = field(default_factory=lambda: ["qkv"])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.rank = number("tuning.rank", self.rank, "an integer >= 1", lambda v: v >= 1, integer=True)
        self.alpha = number("tuning.alpha", self.alpha, "a number > 0", lambda v: v > 0)
        self.dropout = number("tuning.dropout", self.dropout, "a number in [0, 1)", lambda v: 0 <= v < 1)
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise ValueError("tuning.target_modules is empty; name the linear layers to adapt, e.g. [qkv]")


def linear_names(model: nn.Module) -> List[str]:
    """Distinct last name parts of the model's ``nn.Linear`` layers (what ``target_modules`` may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


@register_method
class LoRA(AdamWRecipe):
    name = "lora"
    report_order = 23
    Config = LoRAConfig
    prompts = "none"
    label_option = "rank"

    @classmethod
    def apply(cls, backbone: PromptedBackbone, config: LoRAConfig) -> None:  # type: ignore[override]
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise ImportError("tuning=lora needs HuggingFace peft: pip install 'vpt-lightning[lora]'") from None
        available = linear_names(backbone.model)
        unknown = [t for t in config.target_modules if t not in available]
        if unknown:
            raise ValueError(
                f"tuning.target_modules: {unknown} name no linear layer of the backbone; valid: {available}"
            )
        lora = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            target_modules=list(config.target_modules),
            lora_dropout=config.dropout,
            bias="none",
        )
        inject_adapter_in_model(lora, backbone.model)
