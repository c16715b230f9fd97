"""Semantic segmentation with prompts: dense features from a prompted ViT, SETR-PUP heads, sliding-window
inference and :class:`SegmentationModule` (the classification module's backbone, tuning methods and checkpoints)."""

from .dense import dense_features
from .module import SegmentationConfig, SegmentationModule, default_taps
from .setr_pup import SETRPUP, SETRPUPConfig, SETRUpHead
from .sliding import multi_scale_inference, slide_inference

__all__ = [
    "SETRPUP",
    "SETRPUPConfig",
    "SETRUpHead",
    "SegmentationConfig",
    "SegmentationModule",
    "default_taps",
    "dense_features",
    "multi_scale_inference",
    "slide_inference",
]
