"""Partial-k: the last k blocks of the backbone and what follows them (final norm) train, with a linear head."""

from __future__ import annotations

from dataclasses import dataclass

from timm.utils.model import unfreeze

from ..backbones.base import PromptedBackbone
from .base import FineTuningMethod, TuningConfig, module_names
from .registry import register_method


@dataclass
class PartialConfig(TuningConfig):
    """``tuning=partial``: ``last_blocks`` = k >= 1."""

    method: str = "partial"
    last_blocks: int = 1

    def __post_init__(self) -> None:
        if self.last_blocks < 1:
            raise ValueError(f"tuning.last_blocks={self.last_blocks} must be >= 1")


@register_method
class Partial(FineTuningMethod):
    name = "partial"
    report_order = 11
    label_option = "last_blocks"
    Config = PartialConfig
    prompts = "none"

    @classmethod
    def apply(cls, backbone: PromptedBackbone, config: PartialConfig) -> None:  # type: ignore[override]
        blocks = backbone.blocks()
        if config.last_blocks > len(blocks):
            raise ValueError(f"tuning.last_blocks={config.last_blocks} exceeds the backbone's {len(blocks)} blocks")
        trained = backbone.last_blocks(config.last_blocks) + backbone.final_norms()
        unfreeze(backbone.model, module_names(backbone.model, trained))
