"""VPT-Deep: new prompts at the input of every block, frozen backbone, linear head (the paper's main method)."""

from .base import TuningMethod
from .registry import register_method


@register_method
class VPTDeep(TuningMethod):
    name = "vpt_deep"
    report_order = 31
    prompts = "deep"
    paper_method = "vpt_deep"
