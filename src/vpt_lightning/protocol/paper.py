"""The paper's published numbers: test top-1 (%) per task and method for ViT-B/16 supervised on ImageNet-21k
(the default backbone), and VTAB-1k group means for the other backbones it reports.

Jia et al., "Visual Prompt Tuning", ECCV 2022: Table 1 and its appendix's per-task tables; Tables 2, 4 and 5 for the
other backbones (those from a transcription of the paper).
Per-task numbers are keyed by task config name (``vtab_cifar100``, ``fgvc_cub``) and method name (:data:`METHODS`);
group means by backbone key (:data:`BACKBONES`) and tuning label (``full``, ``linear``, ``mlp_3``, ``partial_1``,
``bias``, ``adapter``, ``vpt_shallow``, ``vpt_deep``). A plain data module: it imports nothing from the package,
so that any part of it (reports, registries, configs) can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

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


# ---- backbones ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PaperBackbone:
    """One of the paper's backbones: a label for reports and the timm names (with tag) that are it; one that
    timm lacks (``timm_names`` empty) comes from a local file, ``weights_url`` says where to get it."""

    label: str
    timm_names: Tuple[str, ...]
    weights_url: Optional[str] = None


DEFAULT_BACKBONE = "vit_b16_in21k"
BACKBONES: Dict[str, PaperBackbone] = {
    DEFAULT_BACKBONE: PaperBackbone("ViT-B/16 supervised ImageNet-21k", ("vit_base_patch16_224.orig_in21k",)),
    "mae": PaperBackbone("ViT-B/16 MAE", ("vit_base_patch16_224.mae",)),
    # no timm weights: a run says it with backbone.reference=mocov3 (conf/backbone/vit_base_patch16_224_mocov3)
    "mocov3": PaperBackbone(
        "ViT-B/16 MoCo v3", (), "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/linear-vit-b-300ep.pth.tar"
    ),
    "swin_b_in21k": PaperBackbone("Swin-B supervised ImageNet-21k", ("swin_base_patch4_window7_224.ms_in22k",)),
    "convnext_b_in21k": PaperBackbone("ConvNeXt-B supervised ImageNet-21k", ("convnext_base.fb_in22k",)),
    "resnet50_in1k": PaperBackbone("ResNet-50 supervised ImageNet-1k", ("resnet50.tv_in1k",)),
}


def backbone_key(name: Optional[str], reference: Optional[str] = None) -> Optional[str]:
    """The paper backbone of a run: ``reference`` (``backbone.reference``) if given, else the one whose timm
    names hold ``name``; ``None`` when the paper has no numbers for it."""
    if reference:
        if reference not in BACKBONES:
            raise ValueError(f"backbone.reference={reference!r} is not one of {sorted(BACKBONES)}")
        return reference
    return next((key for key, backbone in BACKBONES.items() if name in backbone.timm_names), None)


GroupMeans = Tuple[float, float, float]  # VTAB-1k Natural, Specialized, Structured


def _groups(rows: Dict[str, Sequence[float]]) -> Dict[str, GroupMeans]:
    return {method: (float(v[0]), float(v[1]), float(v[2])) for method, v in rows.items()}


#: VTAB-1k group means (%) of the other backbones (paper Tables 2, 4, 5). The ConvNets'
#: "VPT" is the input's pixel border, which ``vpt_shallow`` and ``vpt_deep`` both learn there; ResNet-50's
#: "Partial-1" is the official code's last unit, its whole ``layer4`` (3 bottleneck blocks: our ``partial_3``).
GROUP_MEANS: Dict[str, Dict[str, GroupMeans]] = {
    "mae": _groups(
        {
            "full": (59.29, 79.68, 53.82),
            "linear": (18.87, 53.72, 23.70),
            "partial_1": (58.44, 78.28, 47.64),
            "bias": (54.55, 75.68, 47.70),
            "adapter": (54.90, 75.19, 38.98),
            "vpt_shallow": (39.96, 69.65, 27.50),
            "vpt_deep": (36.02, 60.61, 26.57),
        }
    ),
    "mocov3": _groups(
        {
            "full": (71.95, 84.72, 51.98),
            "linear": (67.46, 81.08, 30.33),
            "partial_1": (72.31, 84.58, 47.89),
            "bias": (72.89, 81.14, 53.43),
            "adapter": (74.19, 82.66, 47.69),
            "vpt_shallow": (67.34, 82.26, 37.55),
            "vpt_deep": (70.27, 83.04, 42.38),
        }
    ),
    "swin_b_in21k": _groups(
        {
            "full": (79.10, 86.21, 59.65),
            "linear": (73.52, 80.77, 33.52),
            "mlp_3": (73.56, 75.21, 35.69),
            "partial_1": (73.11, 81.70, 34.96),
            "bias": (74.19, 80.14, 42.42),
            "vpt_shallow": (79.85, 82.45, 37.75),
            "vpt_deep": (76.78, 84.53, 53.35),
        }
    ),
    "convnext_b_in21k": _groups(
        {
            "full": (77.97, 83.71, 60.41),
            "linear": (74.48, 81.50, 34.76),
            "partial_1": (73.76, 81.64, 39.55),
            "bias": (69.07, 72.81, 25.29),
            "vpt_shallow": (78.48, 83.00, 44.64),
            "vpt_deep": (78.48, 83.00, 44.64),
        }
    ),
    # VPT-Deep + Bias on the default backbone: only its group means are known (the paper's "VPT + other" appendix
    # table, from a transcription, unverified); the paper's Table 1 rows for Adapter and Sidetune on
    # this backbone are not transcribed in our sources, and it has no LoRA row
    DEFAULT_BACKBONE: _groups({"vpt_bias": (77.64, 82.22, 53.87)}),
    "resnet50_in1k": _groups(
        {
            "full": (59.72, 76.66, 54.08),
            "linear": (63.75, 77.60, 30.96),
            "partial_3": (64.34, 78.64, 45.78),
            "bias": (63.51, 77.22, 33.39),
            "vpt_shallow": (66.25, 77.32, 37.52),
            "vpt_deep": (66.25, 77.32, 37.52),
        }
    ),
}


def group_means(backbone: str, tuning: str) -> Optional[GroupMeans]:
    """The paper's VTAB-1k group means of ``tuning`` on ``backbone`` (a :data:`BACKBONES` key), if published
    as such; the default backbone's are computed from its per-task numbers (:func:`reference`) by the report."""
    return GROUP_MEANS.get(backbone, {}).get(tuning)


#: Table 3: ADE20K val mIoU (%) single-scale / multi-scale and tunable parameters (M), SETR-PUP on ViT-L/16
#: ImageNet-21k (paper §4.4). Keyed by tuning-method name (``linear`` = the paper's "Head only");
#: the DeepLab v3+ row is the paper's fully fine-tuned ResNet-101 reference.
SEGMENTATION_TASK = "ade20k_setr_pup"
SEGMENTATION: Dict[str, Dict[str, object]] = {
    "full": {"label": "Full (SETR)", "miou_ss": 48.31, "miou_ms": 50.07, "params_m": 318.31},
    "linear": {"label": "Head only", "miou_ss": 35.12, "miou_ms": 37.46, "params_m": 13.18},
    "bias": {"label": "Bias", "miou_ss": 43.40, "miou_ms": 45.33, "params_m": 13.46},
    "vpt_deep": {"label": "VPT-deep (p=10)", "miou_ss": 42.11, "miou_ms": 44.06, "params_m": 13.43},
    "vpt_bias": {"label": "VPT+Bias (p=100)", "miou_ss": 44.04, "miou_ms": 45.63, "params_m": 15.79},
    "deeplabv3plus_r101": {
        "label": "DeepLab v3+ ResNet-101, full (reference)",
        "miou_ss": 45.47,
        "miou_ms": 46.27,
        "params_m": 63.0,
    },
}
