"""Readers of the natural VTAB-1k tasks' source files, giving each TFDS split with TFDS's example keys.

Each reader takes the folder passed as ``vpt-prepare vtab --source`` (torchvision's layout where torchvision has
the dataset) and returns ``{tfds split name: SourceSplit}``. The key, split and label rules are those of the TFDS
builder version VTAB-1k used (noted per reader), read in the ``tensorflow_datasets`` sources.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

from ..datasets import DataError, require_dir
from .source_split import SourceSplit, array_names, require_file

Splits = Dict[str, SourceSplit]


def _image_from_array(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(array))


# the globals a pickle of numpy arrays needs (numpy 1.x and 2.x module names, pickle protocols 2-5; protocol 2
# written by Python 3 stores bytes through _codecs.encode, a pure str -> bytes conversion)
ARRAY_GLOBALS = frozenset(
    {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler of plain containers and numpy arrays only: any other class or function a file names is
    refused before it is looked up, so a payload in a downloaded pickle never runs."""

    def __init__(self, handle, path: Path) -> None:
        super().__init__(handle, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in ARRAY_GLOBALS:
            return super().find_class(module, name)
        raise DataError(
            f"{self.path}: refused to unpickle {module}.{name} (only numpy arrays and plain values are read from "
            "CIFAR-100's pickles); the file is not torchvision's cifar-100-python file, nothing in it ran"
        )


def read_array_pickle(path: Path) -> dict:
    """A pickle of numpy arrays and plain values (torchvision's CIFAR files), read with :class:`ArrayUnpickler`."""
    with open(path, "rb") as handle:
        entry = ArrayUnpickler(handle, Path(path)).load()
    if not isinstance(entry, dict):
        raise DataError(f"{path}: holds a {type(entry).__name__}, not the dict of a CIFAR-100 file")
    return entry


def read_cifar100(source: Path) -> Splits:
    """CIFAR-100 (TFDS ``cifar100`` 3.0.2): key = the example's index in its file, label = the fine label.

    Reads ``<source>/cifar-100-binary/{train,test}.bin`` (what TFDS reads: a coarse byte, a fine byte and 3072 pixel
    bytes per image) or else torchvision's ``<source>/cifar-100-python/{train,test}`` pickles, which hold the
    same images in the same order.
    """
    binary, pickled = source / "cifar-100-binary", source / "cifar-100-python"
    splits = {}
    for split in ("train", "test"):
        if (binary / f"{split}.bin").is_file():
            raw = np.fromfile(binary / f"{split}.bin", dtype=np.uint8)
            if raw.size % 3074:
                raise DataError(
                    f"{binary / f'{split}.bin'}: {raw.size} bytes is not a whole number of 3074-byte CIFAR-100 records"
                )
            raw = raw.reshape(-1, 3074)
            labels, pixels = raw[:, 1].astype(int), raw[:, 2:]
        else:
            path = require_file(
                pickled / split,
                "CIFAR-100 file",
                f"expected {binary}/{split}.bin or torchvision's "
                "cifar-100-python folder (vpt-prepare vtab --download fetches it)",
            )
            entry = read_array_pickle(path)
            labels, pixels = np.asarray(entry["fine_labels"]), np.asarray(entry["data"], dtype=np.uint8)
        images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        splits[split] = SourceSplit(
            list(range(len(labels))),
            [int(v) for v in labels],
            array_names(split, len(labels)),
            decode=lambda i, images=images: _image_from_array(images[i]),
        )
    return splits


def read_svhn(source: Path) -> Splits:
    """SVHN (TFDS ``svhn_cropped`` 3.0.0): key = index in ``<source>/{train,test}_32x32.mat``, label = digit % 10."""
    from scipy.io import loadmat

    splits = {}
    for split in ("train", "test"):
        path = require_file(
            source / f"{split}_32x32.mat", "SVHN file", "torchvision's SVHN layout; --download fetches it"
        )
        data = loadmat(path)
        images, labels = np.moveaxis(data["X"], -1, 0), data["y"].reshape(-1) % 10
        splits[split] = SourceSplit(
            list(range(len(labels))),
            [int(v) for v in labels],
            array_names(split, len(labels)),
            decode=lambda i, images=images: _image_from_array(images[i]),
        )
    return splits


def read_dtd(source: Path) -> Splits:
    """DTD (TFDS ``dtd`` 3.0.1): fold 1 of ``labels/{train1,val1,test1}.txt``; key = the listed ``class/file.jpg``.

    Labels index the sorted class folders (TFDS's ``dtd_key_attributes.txt`` is the sorted list of the 47).
    Layout: torchvision's ``<source>/dtd/dtd/{images,labels}``.
    """
    root = require_dir(source / "dtd" / "dtd", "DTD folder", "torchvision's layout <source>/dtd/dtd/{images,labels}")
    classes = sorted(d.name for d in (root / "images").iterdir() if d.is_dir())
    splits = {}
    for split, listed in (("train", "train1"), ("validation", "val1"), ("test", "test1")):
        path = require_file(root / "labels" / f"{listed}.txt", "DTD split file", "fold 1 of DTD's labels/")
        keys = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        bad = [k for k in keys if k.split("/")[0] not in classes]
        if bad:
            raise DataError(f"{path}: {bad[0]!r} is not in a class folder of {root / 'images'} ({classes})")
        splits[split] = SourceSplit(
            keys, [classes.index(k.split("/")[0]) for k in keys], keys, files=[root / "images" / k for k in keys]
        )
    return splits


def read_flowers102(source: Path) -> Splits:
    """Flowers102 (TFDS ``oxford_flowers102`` 2.1.1): ``setid.mat`` trnid/valid/tstid; key = ``image_%05d.jpg``.

    Label = ``imagelabels.mat`` - 1. Layout: torchvision's ``<source>/flowers-102/{jpg/,imagelabels.mat,setid.mat}``.
    """
    from scipy.io import loadmat

    root = require_dir(source / "flowers-102", "Flowers102 folder", "torchvision's layout; --download fetches it")
    hint = "Flowers102's own .mat files"
    labels = loadmat(require_file(root / "imagelabels.mat", "Flowers102 file", hint))["labels"][0]
    setid = loadmat(require_file(root / "setid.mat", "Flowers102 file", hint))
    splits = {}
    for split, field in (("train", "trnid"), ("validation", "valid"), ("test", "tstid")):
        ids = [int(i) for i in setid[field][0]]
        names = [f"image_{i:05d}.jpg" for i in ids]
        splits[split] = SourceSplit(
            names, [int(labels[i - 1]) - 1 for i in ids], names, files=[root / "jpg" / n for n in names]
        )
    return splits


def read_pets(source: Path) -> Splits:
    """Oxford-IIIT Pet (TFDS ``oxford_iiit_pet`` 3.2.0): ``annotations/{trainval,test}.txt``; key = ``<name>.jpg``.

    Label = the breed's class id - 1. Layout: torchvision's ``<source>/oxford-iiit-pet/{images,annotations}``.
    """
    root = require_dir(
        source / "oxford-iiit-pet", "Oxford-IIIT Pet folder", "torchvision's layout; --download fetches it"
    )
    splits = {}
    for split, listed in (("train", "trainval.txt"), ("test", "test.txt")):
        path = require_file(root / "annotations" / listed, "Oxford-IIIT Pet list", "the dataset's annotations/")
        names: List[str] = []
        labels: List[int] = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts or line.startswith("#"):
                continue
            if len(parts) != 4 or not re.fullmatch("[0-9]+", parts[1]):
                raise DataError(f"{path}:{number}: expected 'name class_id species breed_id', got {line!r}")
            names.append(parts[0] + ".jpg")
            labels.append(int(parts[1]) - 1)
        splits[split] = SourceSplit(names, labels, names, files=[root / "images" / n for n in names])
    return splits


SUN397_IGNORED = ("/c/church/outdoor/sun_bhenjvsvrtumjuri.jpg", "/t/track/outdoor/sun_aophkoiosslinihb.jpg")


def sun397_split_lists() -> Dict[str, List[str]]:
    """TFDS's own SUN397 partition (``sun397/tfds`` 4.0.0: 70/10/20%), shipped as data in ``tensorflow-datasets``."""
    try:
        from importlib.resources import files

        folder = files("tensorflow_datasets") / "image_classification"
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "SUN397's TFDS split lists ship with tensorflow-datasets (no TensorFlow needed): pip install "
            '"vpt-lightning[tfds]"; or pass --official-splits, or prepare it with --redraw'
        ) from err
    return {
        split: (folder / f"sun397_tfds_{short}.txt").read_text().split()
        for split, short in (("train", "tr"), ("validation", "va"), ("test", "te"))
    }


def read_sun397(source: Path) -> Splits:
    """SUN397 (TFDS ``sun397/tfds`` 4.0.0): TFDS's split lists; key = ``/<letter>/<class>/.../<file>.jpg``.

    Label = the index of the file's folder among the sorted 397 classes. Images are copied as they are (TFDS
    resizes them to at most 120,000 pixels and re-encodes them). Layout: torchvision's ``<source>/SUN397/``.
    """
    root = require_dir(source / "SUN397", "SUN397 folder", "torchvision's layout <source>/SUN397/<letter>/<class>/...")
    lists = sun397_split_lists()
    classes = {name: i for i, name in enumerate(sorted({k.rsplit("/", 1)[0] for keys in lists.values() for k in keys}))}
    splits = {}
    for split, keys in lists.items():
        keys = [k for k in keys if k not in SUN397_IGNORED]  # only the images written must exist
        splits[split] = SourceSplit(
            keys,
            [classes[k.rsplit("/", 1)[0]] for k in keys],
            [k.lstrip("/") for k in keys],
            files=[root / k.lstrip("/") for k in keys],
        )
    return splits
