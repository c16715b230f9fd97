"""Where ``vpt-prepare vtab`` reads each VTAB-1k task from: a leaf catalogue (no DataModules, no CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

# each factory takes (source root, download flag) and returns a torchvision dataset of (PIL image, label)
Factory = Callable[[Path, bool], object]


def _tv(name: str, **kwargs) -> Factory:
    def make(root: Path, download: bool):
        import torchvision.datasets as tvd

        return getattr(tvd, name)(str(root), download=download, **kwargs)

    return make


@dataclass(frozen=True)
class TorchvisionSource:
    """How to read one VTAB task from torchvision's copy of its dataset.

    Attributes:
        train: the original training split (train800/val200 are drawn from it).
        test: the test split; ``None`` where torchvision has none (the images not drawn become the test set).
        val: the original validation split, searched too when a given split names its images (the authors'
            val200 of DTD and Flowers102 comes from it).
        label_offset: subtracted from torchvision's label (CLEVR's object counts 3..10 -> VTAB's classes 0..7).
        requires: modules torchvision needs to read this dataset (the ``prepare`` extra).
    """

    train: Factory
    test: Optional[Factory] = None
    val: Optional[Factory] = None
    label_offset: int = 0
    requires: Tuple[str, ...] = ()


TORCHVISION_SOURCES: Dict[str, TorchvisionSource] = {
    "cifar100": TorchvisionSource(_tv("CIFAR100", train=True), _tv("CIFAR100", train=False)),
    "svhn": TorchvisionSource(_tv("SVHN", split="train"), _tv("SVHN", split="test"), requires=("scipy",)),
    "dtd": TorchvisionSource(_tv("DTD", split="train"), _tv("DTD", split="test"), _tv("DTD", split="val")),
    "flowers102": TorchvisionSource(_tv("Flowers102", split="train"), _tv("Flowers102", split="test"),
                                    _tv("Flowers102", split="val"), requires=("scipy",)),
    "pets": TorchvisionSource(_tv("OxfordIIITPet", split="trainval"), _tv("OxfordIIITPet", split="test")),
    "patch_camelyon": TorchvisionSource(_tv("PCAM", split="train"), _tv("PCAM", split="test"), _tv("PCAM", split="val"),
                                        requires=("h5py",)),
    # VTAB's CLEVR test set is CLEVR's validation split (the test split has no labels)
    "clevr_count": TorchvisionSource(_tv("CLEVRClassification", split="train"),
                                     _tv("CLEVRClassification", split="val"), label_offset=3),
    "caltech101": TorchvisionSource(_tv("Caltech101"), requires=("scipy",)),
    "sun397": TorchvisionSource(_tv("SUN397")),
    "eurosat": TorchvisionSource(_tv("EuroSAT")),
}
