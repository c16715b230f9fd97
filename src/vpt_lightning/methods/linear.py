"""Linear probe: a linear head on the frozen backbone's pooled features (the backbone runs without autograd)."""

from .base import TuningMethod
from .registry import register_method


@register_method
class Linear(TuningMethod):
    name = "linear"
    report_order = 10
    prompts = "none"
    head_only = True
    paper_method = "linear"
