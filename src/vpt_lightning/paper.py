"""The paper's published numbers: test top-1 (%) per task and method, ViT-B/16 supervised on ImageNet-21k.

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


#: Table 3: ADE20K val mIoU (%) single-scale / multi-scale and tunable parameters (M), SETR-PUP on ViT-L/16
#: ImageNet-21k (VPT_EXTENSIONS.md §6). Keyed by tuning-method name (``linear`` = the paper's "Head only");
#: the DeepLab v3+ row is the paper's fully fine-tuned ResNet-101 reference.
SEGMENTATION_TASK = "ade20k_setr_pup"
SEGMENTATION: Dict[str, Dict[str, object]] = {
    "full": {"label": "Full (SETR)", "miou_ss": 48.31, "miou_ms": 50.07, "params_m": 318.31},
    "linear": {"label": "Head only", "miou_ss": 35.12, "miou_ms": 37.46, "params_m": 13.18},
    "bias": {"label": "Bias", "miou_ss": 43.40, "miou_ms": 45.33, "params_m": 13.46},
    "vpt_deep": {"label": "VPT-deep (p=10)", "miou_ss": 42.11, "miou_ms": 44.06, "params_m": 13.43},
    "vpt_bias": {"label": "VPT+Bias (p=100)", "miou_ss": 44.04, "miou_ms": 45.63, "params_m": 15.79},
    "deeplabv3plus_r101": {"label": "DeepLab v3+ ResNet-101, full (reference)", "miou_ss": 45.47, "miou_ms": 46.27,
                           "params_m": 63.0},
}
