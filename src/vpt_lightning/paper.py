"""The paper's published numbers: test top-1 (%) per task and method, ViT-B/16 supervised on ImageNet-21k;
VTAB-1k group means for other backbones (:data:`GROUP_MEANS`).

Jia et al., "Visual Prompt Tuning", ECCV 2022 (spec §4). Keyed by task config name
(``vtab_cifar100``, ``fgvc_cub``) and method name (:data:`METHODS`). A plain data module: it imports nothing from
the package, so that any part of it (reports, registries) can read it.
"""

from __future__ import annotations

from typing import Dict, Optional

METHODS = ("full", "linear", "vpt_shallow", "vpt_deep")


def _row(full: float, linear: float, shallow: float, deep: float) -> Dict[str, float]:
    return dict(zip(METHODS, (full, linear, shallow, deep)))


REFERENCE: Dict[str, Dict[str, float]] = {
    "vtab_cifar100": _row(68.9, 63.4, 77.7, 78.8),
    "vtab_caltech101": _row(87.7, 85.0, 86.9, 90.8),
    "vtab_dtd": _row(64.3, 63.2, 62.6, 65.8),
    "vtab_flowers102": _row(97.2, 97.0, 97.5, 98.0),
    "vtab_pets": _row(86.9, 86.3, 87.3, 88.3),
    "vtab_svhn": _row(87.4, 36.6, 74.5, 78.1),
    "vtab_sun397": _row(38.8, 51.0, 51.2, 49.6),
    "vtab_patch_camelyon": _row(79.7, 78.5, 78.2, 81.8),
    "vtab_eurosat": _row(95.7, 87.5, 92.0, 96.1),
    "vtab_resisc45": _row(84.2, 68.6, 75.6, 83.4),
    "vtab_diabetic_retinopathy": _row(73.9, 74.0, 72.9, 68.4),
    "vtab_clevr_count": _row(56.3, 34.3, 50.5, 68.5),
    "vtab_clevr_distance": _row(58.6, 30.6, 58.6, 60.0),
    "vtab_dmlab": _row(41.7, 33.2, 40.5, 46.5),
    "vtab_kitti_distance": _row(65.5, 55.4, 67.1, 72.8),
    "vtab_dsprites_location": _row(57.5, 12.5, 68.7, 73.6),
    "vtab_dsprites_orientation": _row(46.7, 20.0, 36.1, 47.9),
    "vtab_smallnorb_azimuth": _row(25.7, 9.6, 20.2, 32.9),
    "vtab_smallnorb_elevation": _row(29.1, 19.2, 34.1, 37.8),
    "fgvc_cub": _row(87.3, 85.3, 86.7, 88.5),
    "fgvc_nabirds": _row(82.7, 75.9, 78.8, 84.2),
    "fgvc_oxford_flowers": _row(98.8, 97.9, 98.4, 99.0),
    "fgvc_stanford_dogs": _row(89.4, 86.2, 90.7, 90.2),
    "fgvc_stanford_cars": _row(84.5, 51.3, 68.7, 83.6),
}


def reference(task: str, method: str) -> Optional[float]:
    """The paper's number for task config name ``task`` and ``method``, ``None`` where it published none."""
    return REFERENCE.get(task, {}).get(method)


#: the backbone (timm name) of the per-task numbers above
REFERENCE_BACKBONE = "vit_base_patch16_224.orig_in21k"


def _groups(natural: float, specialized: float, structured: float) -> Dict[str, float]:
    return {"natural": natural, "specialized": specialized, "structured": structured}


_CONVNEXT_VPT = _groups(78.48, 83.00, 44.64)
_RESNET_VPT = _groups(66.25, 77.32, 37.52)

#: VTAB-1k group means (%) the paper reports for other backbones (it gives no per-task numbers for them), by timm
#: name and method label. Table 5, ConvNets (VPT_EXTENSIONS §8, from a transcription, not checked against the PDF).
#: The paper's "VPT" on a ConvNet is the input's pixel border, which ``vpt_shallow`` and ``vpt_deep`` both learn
#: there. Its "Partial-1" is the official code's last trained unit: ConvNeXt's last block and final norm (our
#: ``partial_1``), ResNet-50's whole ``layer4``, i.e. its last 3 bottleneck blocks (our ``partial_3``).
GROUP_MEANS: Dict[str, Dict[str, Dict[str, float]]] = {
    "convnext_base.fb_in22k": {
        "full": _groups(77.97, 83.71, 60.41),
        "linear": _groups(74.48, 81.50, 34.76),
        "partial_1": _groups(73.76, 81.64, 39.55),
        "bias": _groups(69.07, 72.81, 25.29),
        "vpt_shallow": _CONVNEXT_VPT,
        "vpt_deep": _CONVNEXT_VPT,
    },
    "resnet50.tv_in1k": {
        "full": _groups(59.72, 76.66, 54.08),
        "linear": _groups(63.75, 77.60, 30.96),
        "partial_3": _groups(64.34, 78.64, 45.78),
        "bias": _groups(63.51, 77.22, 33.39),
        "vpt_shallow": _RESNET_VPT,
        "vpt_deep": _RESNET_VPT,
    },
}


def group_means(backbone: Optional[str], method: str) -> Optional[Dict[str, float]]:
    """The paper's VTAB-1k group means for ``backbone`` (timm name) and ``method``, ``None`` where it gives none."""
    return GROUP_MEANS.get(backbone or "", {}).get(method)
