"""``SegmentationModule``: semantic segmentation with a SETR-PUP decoder on a frozen, prompted ViT.

A subclass of :class:`~vpt_lightning.module.VPTModule`: the backbone, prompts, tuning methods, optimizer configs,
schedule and small task checkpoints are the classification module's; only the head (SETR-PUP on tapped block
outputs), the loss (pixel cross-entropy with an ignore index, auxiliary heads weighted), the metrics (mIoU) and
inference (sliding window, optional multi-scale + flip at test) differ. It swaps the task's head through the
``build_head`` hook, so ``module.task`` holds the prompted backbone and the SETR-PUP head; ``vpt-train`` writes
task packages for classification runs only (a SETR-PUP task is used through this module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from ..dataclass_config import DataclassConfig
from ..methods import TuningMethod
from ..module import VPTModule
from .dense import check_taps, dense_features
from .setr_pup import SETRPUP, SETRPUPConfig
from .sliding import multi_scale_inference, slide_inference

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmsegmentation's ADE20K multi-scale test


def default_taps(depth: int) -> List[int]:
    """SETR-PUP's taps scaled to ``depth``: blocks 9, 14, 19, 23 of a 24-block ViT-L."""
    return sorted({max(0, depth * k // 24 - 1) for k in (10, 15, 20)} | {depth - 1})


@dataclass
class SegmentationConfig(DataclassConfig):
    """The ``segmentation`` config node.

    Attributes:
        taps: blocks whose outputs feed the heads (the last: the decode head; the others: auxiliary heads);
            ``None``: :func:`default_taps` (9, 14, 19, 23 for ViT-L).
        head: :class:`~vpt_lightning.segmentation.setr_pup.SETRPUPConfig` fields.
        ignore_index: label value that neither the loss nor the metrics count.
        window: sliding-window size at evaluation; ``None``: the backbone's input size.
        stride: sliding-window stride; ``None``: 2/3 of the window (341 for 512).
        ms_scales: image scales of the multi-scale test (logged as ``test/miou_ms``); empty: single scale only.
        flip: add horizontally flipped copies to the multi-scale test.
        head_lr_mult: learning-rate factor of the heads relative to the prompts (10 in SETR).
    """

    taps: Optional[List[int]] = None
    head: Dict[str, Any] = field(default_factory=dict)
    ignore_index: int = 255
    window: Optional[int] = None
    stride: Optional[int] = None
    ms_scales: List[float] = field(default_factory=list)
    flip: bool = True
    head_lr_mult: float = 1.0

    group = "segmentation"

    def __post_init__(self) -> None:
        self.taps = None if self.taps is None else [int(t) for t in self.taps]
        self.head = SETRPUPConfig.from_mapping(self.head).to_dict()  # validated, stored as a plain dict
        self.ms_scales = [float(s) for s in self.ms_scales]
        if any(s <= 0 for s in self.ms_scales):
            raise ValueError(f"segmentation.ms_scales={self.ms_scales} must be positive scale factors")
        if self.head_lr_mult <= 0:
            raise ValueError(f"segmentation.head_lr_mult={self.head_lr_mult} must be > 0")


class SegmentationModule(VPTModule):
    """Semantic segmentation: a SETR-PUP decoder on the tapped block outputs of a frozen, prompted ViT.

    Batches are ``(images (B, 3, H, W), masks (B, H', W') int64)``; logits are resized to the mask size. Logged:
    ``train/loss``, ``{val,test}/loss``, ``{val,test}/miou`` (single scale, sliding window), ``{val,test}/acc``
    (pixel accuracy) and, with ``segmentation.ms_scales``, ``test/miou_ms`` (multi-scale + flip).

    Args: those of :class:`~vpt_lightning.module.VPTModule` (the keyword-only ones such as ``task_name`` pass
    through), plus ``segmentation``: :class:`SegmentationConfig`
    fields. The tuning method decides what trains in the backbone (``vpt_deep``, ``bias``, ``linear`` = head only);
    a method with its own classifier head (``mlp``) is refused.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: Any,
        prompt: Any = None,
        optim: Any = None,
        tuning: Any = None,
        segmentation: Union[SegmentationConfig, Mapping[str, Any], None] = None,
        backbone_eval: Optional[bool] = None,
        compile: bool = False,
        grad_checkpointing: bool = False,
        **kwargs: Any,
    ) -> None:
        if compile:
            raise ValueError("compile=true is not supported for segmentation (the tapped blocks are read by hooks)")
        # read by build_head / build_loss, which VPTModule.__init__ calls
        self.seg_config = SegmentationConfig.parse(segmentation)
        super().__init__(
            num_classes, backbone, prompt, optim, tuning, backbone_eval, compile, grad_checkpointing, **kwargs
        )
        if self.tuning_method.build_head.__func__ is not TuningMethod.build_head.__func__:
            raise ValueError(
                f"tuning={self.tuning_config.name} brings its own classifier head; segmentation uses the SETR-PUP "
                "heads (choose tuning=vpt_deep|vpt_shallow|bias|linear|full|partial)"
            )
        self.hparams["segmentation"] = self.seg_config.to_dict()
        window = self.seg_config.window or int(self.data_config["input_size"][-1])
        self.window = window
        self.stride = self.seg_config.stride or max(1, window * 2 // 3)
        metrics = lambda: MetricCollection(  # noqa: E731
            {
                "miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=self.seg_config.ignore_index),
                "acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=self.seg_config.ignore_index),
            }
        )
        self.val_metrics = metrics().clone(prefix="val/")
        self.test_metrics = metrics().clone(prefix="test/")
        self.test_ms_metrics = MetricCollection(
            {
                "miou_ms": MulticlassJaccardIndex(
                    num_classes, average="macro", ignore_index=self.seg_config.ignore_index
                )
            },
            prefix="test/",
        )

    # ---- hooks ------------------------------------------------------------------------------------------
    def build_head(self, in_features: int, num_classes: int) -> nn.Module:
        """The SETR-PUP decode head on the last tap and auxiliary heads on the others."""
        self.taps = check_taps(self.backbone, self.seg_config.taps or default_taps(len(self.backbone.model.blocks)))
        patch = self.backbone.model.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"SETR-PUP needs a square patch size, got {tuple(patch)}")
        head = SETRPUPConfig.from_mapping(self.seg_config.head)
        return SETRPUP(self.backbone.embed_dim, num_classes, len(self.taps), patch[0], head)

    def build_loss(self) -> nn.Module:
        """Pixel cross-entropy, ignoring ``segmentation.ignore_index`` (mean over the counted pixels)."""
        return nn.CrossEntropyLoss(ignore_index=self.seg_config.ignore_index)

    def optimizer_parameters(self, lr: float) -> List[Any]:
        """Two groups: backbone-side tensors (prompts, biases...) at ``lr``, the heads at ``lr * head_lr_mult``."""
        head = [p for p in self.head.parameters() if p.requires_grad]
        in_head = {id(p) for p in head}
        rest = [p for p in self.trainable_parameters() if id(p) not in in_head]
        groups: List[Dict[str, Any]] = [{"params": rest}] if rest else []
        return groups + [{"params": head, "lr": lr * self.seg_config.head_lr_mult}]

    # ---- model ------------------------------------------------------------------------------------------
    def forward_all(self, images: torch.Tensor):
        """``(logits, aux_logits)`` of the decode and auxiliary heads, at ``patch`` x the map size."""
        return self.head(dense_features(self.backbone, images, self.taps))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Decode-head logits ``(B, K, H, W)`` of images of the backbone's input size."""
        return self.forward_all(images)[0]

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``logits`` resized (bilinear) to the masks' size."""
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        return self.criterion(logits, masks)

    def predict_logits(self, images: torch.Tensor, size=None, multi_scale: bool = False) -> torch.Tensor:
        """Sliding-window logits (or multi-scale + flip probabilities) resized to ``size`` (default: the images')."""
        if multi_scale:
            out = multi_scale_inference(
                self,
                images,
                self.seg_config.ms_scales,
                self.seg_config.flip,
                self.window,
                self.stride,
                self.hparams.num_classes,
            )
        else:
            out = slide_inference(self, images, self.window, self.stride, self.hparams.num_classes)
        if size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
        return out

    # ---- steps ------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, masks = batch
        logits, aux = self.forward_all(images)
        decode = self.loss(logits, masks)
        loss = decode + sum(self.head.aux_weight * self.loss(a, masks) for a in aux)
        size = masks.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size, sync_dist=True)
        self.log("train/loss_decode", decode, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        return loss

    def _eval_step(self, batch: Any, metrics: MetricCollection, stage: str) -> None:
        images, masks = batch
        logits = self.predict_logits(images, masks.shape[-2:])
        self.log(f"{stage}/loss", self.criterion(logits, masks), sync_dist=True, batch_size=masks.shape[0])
        metrics.update(logits.argmax(dim=1), masks)
        self.log_dict(metrics, prog_bar=True, on_epoch=True)
        if stage == "test" and self.seg_config.ms_scales:
            probs = self.predict_logits(images, masks.shape[-2:], multi_scale=True)
            self.test_ms_metrics.update(probs.argmax(dim=1), masks)
            self.log_dict(self.test_ms_metrics, on_epoch=True)
