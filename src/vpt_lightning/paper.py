"""The paper's published numbers: test top-1 (%) per task and method, ViT-B/16 supervised on ImageNet-21k.

Jia et al., "Visual Prompt Tuning", ECCV 2022 (spec §4). Keyed by task config name
(``vtab_cifar100``, ``fgvc_cub``) and method name (:data:`METHODS`). A plain data module: it imports nothing from
the package, so that any part of it (reports, registries) can read it.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

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


#: VTAB-1k group means (Natural, Specialized, Structured) that the paper reports for its other backbones, by
#: backbone and method label (spec §8, from a transcription: unverified). No per-task numbers exist for them.
GROUP_MEANS: Dict[str, Dict[str, Tuple[float, float, float]]] = {
    # Swin-B, ImageNet-21k (Table 2)
    "swin_base_patch4_window7_224.ms_in22k": {
        "full": (79.10, 86.21, 59.65),
        "linear": (73.52, 80.77, 33.52),
        "mlp_3": (73.56, 75.21, 35.69),
        "partial_1": (73.11, 81.70, 34.96),
        "bias": (74.19, 80.14, 42.42),
        "vpt_shallow": (79.85, 82.45, 37.75),
        "vpt_deep": (76.78, 84.53, 53.35),
    },
}
#: other timm names of those backbones (timm's deprecated names)
BACKBONE_ALIASES = {"swin_base_patch4_window7_224_in22k": "swin_base_patch4_window7_224.ms_in22k"}


def group_means(backbone: str, method: str) -> Optional[Tuple[float, float, float]]:
    """The paper's (Natural, Specialized, Structured) means for a backbone (timm name) and method, if reported."""
    return GROUP_MEANS.get(BACKBONE_ALIASES.get(backbone, backbone), {}).get(method)


def has_group_means(backbone: str) -> bool:
    """Whether the paper reports group means (and no per-task numbers) for this backbone."""
    return BACKBONE_ALIASES.get(backbone, backbone) in GROUP_MEANS
