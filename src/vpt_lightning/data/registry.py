"""The task catalogue: VTAB-1k (19) and FGVC (5) with classes, folders, prompt lengths and official names.

The paper's published numbers per task are in :mod:`vpt_lightning.protocol.paper`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

VTAB_GROUPS = ("natural", "specialized", "structured")


@dataclass(frozen=True)
class TaskInfo:
    """Facts about one benchmark task.

    Attributes:
        name: config name (``conf/data/<benchmark>_<name>.yaml``).
        benchmark: ``vtab`` or ``fgvc``.
        group: VTAB group (natural, specialized, structured), ``None`` for FGVC.
        num_classes: classes of the task.
        folder: folder of the task under the benchmark root (the common TF-free VTAB-1k layout, or the FGVC roots).
        display_name: name in tables.
        default_prompt_length: VPT-Deep prompt length published with the paper's hyper-parameters.
        official_name: the task's name in the VTAB code and the VPT configs (``cifar(num_classes=100)``,
            ``clevr(task="count_all")``...), as used for keys of the authors' split files.
    """

    name: str
    benchmark: str
    group: Optional[str]
    num_classes: int
    folder: str
    display_name: str
    default_prompt_length: int
    official_name: str = ""

    @property
    def recipe(self) -> str:
        """Transform recipe: ``vtab`` (resize, no augmentation) or ``fgvc`` (crop + flip)."""
        return self.benchmark

    @property
    def config_name(self) -> str:
        return f"{self.benchmark}_{self.name}"

    @property
    def aliases(self) -> Tuple[str, ...]:
        """Every name this task goes by (ours, its folder, the official VTAB/VPT name), normalised."""
        names = (self.name, self.config_name, self.folder, self.official_name, f"{self.benchmark}-{self.official_name}")
        return tuple(dict.fromkeys(normalise_name(n) for n in names if n))


def normalise_name(name: str) -> str:
    """Lower case without spaces and quotes, so that ``vtab-clevr(task="count_all")`` variants compare equal."""
    return re.sub(r"[\s'\"]", "", name).lower()


_TASKS: List[TaskInfo] = [
    # VTAB-1k natural
    TaskInfo("cifar100", "vtab", "natural", 100, "cifar", "CIFAR-100", 10, official_name="cifar(num_classes=100)"),
    TaskInfo("caltech101", "vtab", "natural", 102, "caltech101", "Caltech101", 10, official_name="caltech101"),
    TaskInfo("dtd", "vtab", "natural", 47, "dtd", "DTD", 10, official_name="dtd"),
    TaskInfo(
        "flowers102", "vtab", "natural", 102, "oxford_flowers102", "Flowers102", 1, official_name="oxford_flowers102"
    ),
    TaskInfo("pets", "vtab", "natural", 37, "oxford_iiit_pet", "Pets", 1, official_name="oxford_iiit_pet"),
    TaskInfo("svhn", "vtab", "natural", 10, "svhn", "SVHN", 50, official_name="svhn"),
    TaskInfo("sun397", "vtab", "natural", 397, "sun397", "SUN397", 5, official_name="sun397"),
    # VTAB-1k specialized
    TaskInfo(
        "patch_camelyon", "vtab", "specialized", 2, "patch_camelyon", "Camelyon", 100, official_name="patch_camelyon"
    ),
    TaskInfo("eurosat", "vtab", "specialized", 10, "eurosat", "EuroSAT", 100, official_name="eurosat"),
    TaskInfo("resisc45", "vtab", "specialized", 45, "resisc45", "RESISC45", 10, official_name="resisc45"),
    TaskInfo(
        "diabetic_retinopathy",
        "vtab",
        "specialized",
        5,
        "diabetic_retinopathy",
        "Retinopathy",
        1,
        official_name='diabetic_retinopathy(config="btgraham-300")',
    ),
    # VTAB-1k structured
    TaskInfo(
        "clevr_count",
        "vtab",
        "structured",
        8,
        "clevr_count",
        "CLEVR-count",
        100,
        official_name='clevr(task="count_all")',
    ),
    TaskInfo(
        "clevr_distance",
        "vtab",
        "structured",
        6,
        "clevr_dist",
        "CLEVR-dist",
        200,
        official_name='clevr(task="closest_object_distance")',
    ),
    TaskInfo("dmlab", "vtab", "structured", 6, "dmlab", "DMLab", 100, official_name="dmlab"),
    TaskInfo(
        "kitti_distance",
        "vtab",
        "structured",
        4,
        "kitti",
        "KITTI-dist",
        100,
        official_name='kitti(task="closest_vehicle_distance")',
    ),
    TaskInfo(
        "dsprites_location",
        "vtab",
        "structured",
        16,
        "dsprites_loc",
        "dSpr-loc",
        100,
        official_name='dsprites(predicted_attribute="label_x_position",num_classes=16)',
    ),
    TaskInfo(
        "dsprites_orientation",
        "vtab",
        "structured",
        16,
        "dsprites_ori",
        "dSpr-ori",
        100,
        official_name='dsprites(predicted_attribute="label_orientation",num_classes=16)',
    ),
    TaskInfo(
        "smallnorb_azimuth",
        "vtab",
        "structured",
        18,
        "smallnorb_azi",
        "sNORB-azi",
        200,
        official_name='smallnorb(predicted_attribute="label_azimuth")',
    ),
    TaskInfo(
        "smallnorb_elevation",
        "vtab",
        "structured",
        9,
        "smallnorb_ele",
        "sNORB-ele",
        200,
        official_name='smallnorb(predicted_attribute="label_elevation")',
    ),
    # FGVC
    TaskInfo("cub", "fgvc", None, 200, "CUB_200_2011", "CUB-200-2011", 10),
    TaskInfo("nabirds", "fgvc", None, 555, "nabirds", "NABirds", 50),
    TaskInfo("oxford_flowers", "fgvc", None, 102, "OxfordFlower", "Oxford Flowers", 5),
    TaskInfo("stanford_dogs", "fgvc", None, 120, "Stanford-dogs", "Stanford Dogs", 100),
    TaskInfo("stanford_cars", "fgvc", None, 196, "Stanford-cars", "Stanford Cars", 200),
]

TASKS: Dict[str, TaskInfo] = {f"{t.benchmark}_{t.name}": t for t in _TASKS}


def get_task(name: str, benchmark: Optional[str] = None) -> TaskInfo:
    """Look a task up by ``name`` (``cifar100``) or config name (``vtab_cifar100``)."""
    candidates = [t for t in _TASKS if name in (t.name, t.config_name) and benchmark in (None, t.benchmark)]
    if len(candidates) != 1:
        valid = sorted(t.name for t in _TASKS if benchmark in (None, t.benchmark))
        raise KeyError(f"unknown {benchmark or 'benchmark'} task {name!r}; valid names: {valid}")
    return candidates[0]


def vtab_tasks(group: Optional[str] = None) -> List[TaskInfo]:
    """The 19 VTAB-1k tasks in the paper's order, or those of one group."""
    if group is not None and group not in VTAB_GROUPS:
        raise ValueError(f"VTAB group {group!r} is not one of {list(VTAB_GROUPS)}")
    return [t for t in _TASKS if t.benchmark == "vtab" and group in (None, t.group)]


def fgvc_tasks() -> List[TaskInfo]:
    """The 5 FGVC datasets in the paper's order."""
    return [t for t in _TASKS if t.benchmark == "fgvc"]
