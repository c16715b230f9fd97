"""Sliding-window and multi-scale (+ flip) inference for segmentation models with a fixed input size.

As mmsegmentation's ``slide_inference``: windows of ``window`` px every ``stride`` px, the last one in each
direction shifted back to end at the image border; the logits of overlapping windows are averaged per pixel.
An image smaller than the window is padded (bottom/right, zeros = the mean after normalisation) and the logits
cropped back, since a ViT built for one input size cannot take a smaller one.
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, window, window) -> (B, K, window, window) logits


def window_starts(size: int, window: int, stride: int) -> List[int]:
    """Start offsets of the windows along one axis of ``size`` px (``size >= window``)."""
    count = max(size - window + stride - 1, 0) // stride + 1
    return [min(i * stride, size - window) for i in range(count)]


def slide_inference(model: Model, images: torch.Tensor, window: int, stride: int, num_classes: int) -> torch.Tensor:
    """Logits ``(B, num_classes, H, W)`` of ``images`` from overlapping ``window`` x ``window`` crops."""
    if not 0 < stride <= window:
        raise ValueError(f"sliding window: stride={stride} must be in [1, window={window}]")
    height, width = images.shape[-2:]
    pad_h, pad_w = max(window - height, 0), max(window - width, 0)
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    full_h, full_w = images.shape[-2:]
    logits = images.new_zeros(images.shape[0], num_classes, full_h, full_w)
    counts = images.new_zeros(1, 1, full_h, full_w)
    for top in window_starts(full_h, window, stride):
        for left in window_starts(full_w, window, stride):
            crop = images[..., top : top + window, left : left + window]
            logits[..., top : top + window, left : left + window] += model(crop)
            counts[..., top : top + window, left : left + window] += 1
    return (logits / counts)[..., :height, :width]


def multi_scale_inference(
    model: Model,
    images: torch.Tensor,
    scales: Sequence[float],
    flip: bool,
    window: int,
    stride: int,
    num_classes: int,
) -> torch.Tensor:
    """Class probabilities ``(B, K, H, W)`` averaged over rescaled (and horizontally flipped) copies of ``images``.

    Each copy is resized by ``scale`` (bilinear), run with :func:`slide_inference`, its softmax resized back to
    ``(H, W)`` (and un-flipped); the mean over copies is returned (as mmsegmentation's multi-scale test).
    """
    if not scales:
        raise ValueError("multi-scale inference needs at least one scale")
    size = images.shape[-2:]
    total = None
    copies = 0
    for scale in scales:
        scaled = (
            images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        )
        for flipped in [False, True] if flip else [False]:
            view = scaled.flip(-1) if flipped else scaled
            probs = slide_inference(model, view, window, stride, num_classes).softmax(dim=1)
            probs = probs.flip(-1) if flipped else probs
            probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            total = probs if total is None else total + probs
            copies += 1
    return total / copies
