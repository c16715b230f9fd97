"""VPT-Shallow: one prompt set inserted once before block 0, frozen backbone, linear head."""

from .base import TuningMethod
from .registry import register_method


@register_method
class VPTShallow(TuningMethod):
    name = "vpt_shallow"
    report_order = 30
    prompts = "shallow"
    paper_method = "vpt_shallow"
