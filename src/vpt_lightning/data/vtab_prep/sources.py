"""Where ``vpt-prepare vtab`` reads each VTAB-1k task from, and how VTAB-1k slices it: the source catalogue.

Two kinds of source:

- :data:`EXACT_SOURCES`: readers that rebuild each TFDS example's key from the source files, so that the TFDS order
  (:mod:`.tfds_order`) and VTAB's slices (``task_adaptation/data/<task>.py``) give VTAB-1k's own
  train800, val200 and test examples.
- :data:`TORCHVISION_SOURCES`: torchvision's copies, for the authors' split file (``--official-splits``) and for
  seeded re-draws (``--redraw``), and for Caltech101, whose TFDS split cannot be rebuilt offline (TFDS picks 30
  training images per class with NumPy's seed over an unsorted file-system walk).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from .readers_natural import read_cifar100, read_dtd, read_flowers102, read_pets, read_sun397, read_svhn
from .readers_specialized import read_eurosat, read_patch_camelyon, read_resisc45, read_retinopathy
from .readers_structured import (
    clevr_count,
    clevr_distance,
    read_clevr,
    read_dmlab,
    read_dsprites,
    read_kitti,
    read_smallnorb,
)
from .source_split import SourceSplit
from .tfds_order import Slice

# ---- exact: TFDS's keys and order ------------------------------------------------------------------------


@dataclass(frozen=True)
class ExactSource:
    """One task read from its source files in TFDS's order.

    Attributes:
        builder: the TFDS builder and version VTAB-1k used (whose ``_generate_examples`` key the reader rebuilds).
        get: how to get the source files, and where they go under ``--source``.
        read: ``source root -> {tfds split: SourceSplit}``.
        train800, val200, test: VTAB's slices.
        requires: modules the reader needs (named in the error when missing).
        note: what differs from TFDS's copy, if anything.
    """

    builder: str
    get: str
    read: Callable[[Path], Dict[str, SourceSplit]]
    train800: Slice
    val200: Slice
    test: Slice
    requires: Tuple[str, ...] = ()
    note: str = ""


FIRST_800 = Slice("train", length=800)
VAL_FIRST_200 = Slice("validation", length=200)
TEST = Slice("test")


def _official(val200: Slice = VAL_FIRST_200, test: Slice = TEST) -> Dict[str, Slice]:
    return {"train800": FIRST_800, "val200": val200, "test": test}


_TV = "torchvision's layout (vpt-prepare vtab --download fetches it)"
_CLEVR = dict(
    builder="clevr 3.1.0",
    get=f"CLEVR_v1.0 in {_TV}",
    **_official(Slice("train", start_pct=(90,), length=200), Slice("validation")),
)
_DSPRITES = dict(
    builder="dsprites 2.0.0",
    get="the released dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz in <source>/dsprites/",
    **_official(Slice("train", start_pct=(80,), length=200), Slice("train", start_pct=(80, 10))),
)
_SMALLNORB = dict(
    builder="smallnorb 2.0.0",
    get="the NYU -dat/-info .mat files (un-gzipped) in <source>/smallnorb/",
    **_official(Slice("test", length=200), Slice("test", start_pct=(50,))),
)
_SATELLITE_SPLITS = _official(Slice("train", start_pct=(60,), length=200), Slice("train", start_pct=(60, 20)))

EXACT_SOURCES: Dict[str, ExactSource] = {
    "cifar100": ExactSource(
        "cifar100 3.0.2",
        f"cifar-100-binary/ or cifar-100-python/ in {_TV}",
        read_cifar100,
        **_official(Slice("train", start_pct=(90,), length=200)),
    ),
    "dtd": ExactSource("dtd 3.0.1", _TV, read_dtd, **_official()),
    "flowers102": ExactSource("oxford_flowers102 2.1.1", _TV, read_flowers102, **_official(), requires=("scipy",)),
    "pets": ExactSource(
        "oxford_iiit_pet 3.2.0", _TV, read_pets, **_official(Slice("train", start_pct=(80,), length=200))
    ),
    "svhn": ExactSource(
        "svhn_cropped 3.0.0",
        _TV,
        read_svhn,
        **_official(Slice("train", start_pct=(90,), length=200)),
        requires=("scipy",),
    ),
    "sun397": ExactSource(
        "sun397/tfds 4.0.0",
        f"SUN397/ in {_TV}; TFDS's split lists from the tensorflow-datasets package",
        read_sun397,
        **_official(),
        requires=("tensorflow_datasets",),
        note="images copied as they are (TFDS shrinks them to <= 120,000 pixels, JPEG quality 72)",
    ),
    "patch_camelyon": ExactSource("patch_camelyon 2.0.0", _TV, read_patch_camelyon, **_official(), requires=("h5py",)),
    "eurosat": ExactSource("eurosat/rgb 2.0.0", _TV, read_eurosat, **_SATELLITE_SPLITS),
    "resisc45": ExactSource(
        "resisc45 3.0.0", "NWPU-RESISC45/ (the released .rar, unpacked) in <source>", read_resisc45, **_SATELLITE_SPLITS
    ),
    "diabetic_retinopathy": ExactSource(
        "diabetic_retinopathy_detection/btgraham-300 3.0.0",
        "Kaggle's train/, test/, trainLabels.csv and retinopathy_solution.csv in <source>/diabetic_retinopathy/",
        read_retinopathy,
        **_official(),
        requires=("cv2",),
        note="btgraham-300 done with OpenCV as TFDS does",
    ),
    "clevr_count": ExactSource(read=partial(read_clevr, label=clevr_count), **_CLEVR),
    "clevr_distance": ExactSource(read=partial(read_clevr, label=clevr_distance), **_CLEVR),
    "dmlab": ExactSource(
        "dmlab 2.0.1",
        "dmlab.tar.gz (the archive TFDS downloads) unpacked in <source>/dmlab/",
        read_dmlab,
        **_official(),
    ),
    "kitti_distance": ExactSource(
        "kitti 3.2.0 (VTAB: 3.1.0)",
        "data_object_image_2.zip, data_object_label_2.zip and devkit_object.zip unpacked in <source>/kitti/",
        read_kitti,
        **_official(),
    ),
    "dsprites_location": ExactSource(read=partial(read_dsprites, attribute="x_position"), **_DSPRITES),
    "dsprites_orientation": ExactSource(read=partial(read_dsprites, attribute="orientation"), **_DSPRITES),
    "smallnorb_azimuth": ExactSource(read=partial(read_smallnorb, attribute="azimuth"), **_SMALLNORB),
    "smallnorb_elevation": ExactSource(read=partial(read_smallnorb, attribute="elevation"), **_SMALLNORB),
}

# ---- torchvision: the authors' split file, seeded re-draws, Caltech101 --------------------------------------

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
    "flowers102": TorchvisionSource(
        _tv("Flowers102", split="train"),
        _tv("Flowers102", split="test"),
        _tv("Flowers102", split="val"),
        requires=("scipy",),
    ),
    "pets": TorchvisionSource(_tv("OxfordIIITPet", split="trainval"), _tv("OxfordIIITPet", split="test")),
    "patch_camelyon": TorchvisionSource(
        _tv("PCAM", split="train"), _tv("PCAM", split="test"), _tv("PCAM", split="val"), requires=("h5py",)
    ),
    # VTAB's CLEVR test set is CLEVR's validation split (the test split has no labels)
    "clevr_count": TorchvisionSource(
        _tv("CLEVRClassification", split="train"), _tv("CLEVRClassification", split="val"), label_offset=3
    ),
    "caltech101": TorchvisionSource(_tv("Caltech101"), requires=("scipy",)),
    "sun397": TorchvisionSource(_tv("SUN397")),
    "eurosat": TorchvisionSource(_tv("EuroSAT")),
}
