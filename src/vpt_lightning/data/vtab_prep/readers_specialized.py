"""Readers of the specialized VTAB-1k tasks' source files (see :mod:`.readers_natural` for the contract)."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from ..datasets import DataError, require_dir
from .source_split import SourceSplit, array_names, require_file

Splits = Dict[str, SourceSplit]

EUROSAT_CLASSES = (
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
)


def read_patch_camelyon(source: Path) -> Splits:
    """Patch Camelyon (TFDS ``patch_camelyon`` 2.0.0): key = ``"<train|valid|test>_<index>"`` into the h5 files.

    TFDS's split names (the hash salts) are ``train``, ``validation`` and ``test``. Layout: torchvision's
    ``<source>/pcam/camelyonpatch_level_2_split_<train|valid|test>_<x|y>.h5``; images are read one by one.
    """
    import h5py

    splits = {}
    for split, short in (("train", "train"), ("validation", "valid"), ("test", "test")):
        paths = [
            require_file(
                source / "pcam" / f"camelyonpatch_level_2_split_{short}_{xy}.h5",
                "Patch Camelyon file",
                "torchvision's PCAM layout; --download fetches it",
            )
            for xy in ("x", "y")
        ]
        with h5py.File(paths[1], "r") as f:
            labels = [int(v) for v in np.asarray(f["y"]).reshape(-1)]
        handle: List = []

        def decode(i: int, path: Path = paths[0], handle: List = handle) -> Image.Image:
            if not handle:
                handle.append(h5py.File(path, "r"))
            return Image.fromarray(np.asarray(handle[0]["x"][i]))

        splits[split] = SourceSplit(
            [f"{short}_{i}" for i in range(len(labels))], labels, array_names(split, len(labels)), decode=decode
        )
    return splits


def _class_folder_images(root: Path, pattern: str) -> List[Tuple[str, Path]]:
    """``(class folder, file)`` for every file matching ``pattern`` in the class folders of ``root``."""
    return [
        (folder.name, path)
        for folder in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(folder.glob(pattern))
        if path.is_file()
    ]


def read_eurosat(source: Path) -> Splits:
    """EuroSAT RGB (TFDS ``eurosat/rgb`` 2.0.0): one ``train`` split; key = ``f"{label}_{file name}"``.

    The label is the file name's prefix (``Forest_12.jpg`` -> ``Forest``), indexed in EuroSAT's 10 sorted
    classes. Layout: torchvision's ``<source>/eurosat/2750/<class>/<file>.jpg``.
    """
    root = require_dir(source / "eurosat" / "2750", "EuroSAT folder", "torchvision's layout; --download fetches it")
    items = _class_folder_images(root, "*")
    labels = [path.name.split("_")[0] for _, path in items]
    bad = [path for path, label in zip((p for _, p in items), labels) if label not in EUROSAT_CLASSES]
    if bad:
        raise DataError(f"{bad[0]}: a EuroSAT file name starts with its class, one of {list(EUROSAT_CLASSES)}")
    keys = [f"{label}_{path.name}" for label, (_, path) in zip(labels, items)]
    return {
        "train": SourceSplit(
            keys,
            [EUROSAT_CLASSES.index(label) for label in labels],
            [f"{folder}/{path.name}" for folder, path in items],
            files=[p for _, p in items],
        )
    }


def read_resisc45(source: Path) -> Splits:
    """RESISC45 (TFDS ``resisc45`` 3.0.0): one ``train`` split of ``*.jpg``; key = ``f"{class folder}_{file name}"``.

    Labels index the sorted class folders (TFDS's list of the 45 is sorted). Layout: the released
    ``<source>/NWPU-RESISC45/<class>/<class>_NNN.jpg`` (TFDS's manual folder).
    """
    root = require_dir(source / "NWPU-RESISC45", "RESISC45 folder", "unpack NWPU-RESISC45.rar into --source")
    items = _class_folder_images(root, "*.jpg")
    if not items:
        raise DataError(f"{root}: no <class>/*.jpg images")
    classes = {folder: i for i, folder in enumerate(sorted({folder for folder, _ in items}))}
    return {
        "train": SourceSplit(
            [f"{folder}_{path.name}" for folder, path in items],
            [classes[folder] for folder, _ in items],
            [f"{folder}/{path.name}" for folder, path in items],
            files=[p for _, p in items],
        )
    }


def btgraham_300(path: Path) -> bytes:
    """Ben Graham's preprocessing as TFDS's ``btgraham-300`` config does it, as the JPEG (quality 72) TFDS stores.

    Scale the eye to radius 300, subtract the local average colour (Gaussian blur, sigma 10), keep the disc of
    radius 270 (grey 128 outside) and crop to it. Needs OpenCV, as TFDS does: ``pip install opencv-python-headless``.
    """
    try:
        import cv2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the btgraham-300 preprocessing of Diabetic Retinopathy uses OpenCV, as TFDS does: "
            'pip install "vpt-lightning[retinopathy]" (opencv-python-headless)'
        ) from err
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), flags=3)
    if image is None:
        raise DataError(f"cannot read image {str(path)!r}")
    target = 300
    row = image[image.shape[0] // 2, :, :].sum(axis=1)
    radius = (row > row.mean() / 10.0).sum() / 2.0
    radius = radius if radius >= 1.0 else image.shape[0] / 2.0
    image = cv2.resize(image, dsize=None, fx=target / radius, fy=target / radius)
    image = cv2.addWeighted(image, 4, cv2.GaussianBlur(image, (0, 0), target / 30), -4, 128)
    mask = np.zeros(image.shape)
    keep = int(target * 0.9)
    cv2.circle(mask, center=(image.shape[1] // 2, image.shape[0] // 2), radius=keep, color=(1, 1, 1), thickness=-1)
    image = image * mask + (1 - mask) * 128
    cy, cx = image.shape[0] // 2, image.shape[1] // 2
    image = image[
        max(cy - keep, 0) : min(cy + keep, image.shape[0]), max(cx - keep, 0) : min(cx + keep, image.shape[1]), :
    ]
    ok, encoded = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), 72])
    if not ok:
        raise DataError(f"OpenCV could not encode the processed {str(path)!r}")
    return encoded.tobytes()


def _read_label_csv(path: Path, usage: str = "") -> List[Tuple[str, int]]:
    """``(image, level)`` rows of a Kaggle CSV, those whose ``Usage`` is ``usage`` if given."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        needed = {"image", "level"} | ({"Usage"} if usage else set())
        if not needed <= set(reader.fieldnames or ()):
            raise DataError(f"{path}: expected the columns {sorted(needed)}, found {reader.fieldnames}")
        rows = []
        for number, row in enumerate(reader, start=2):
            if usage and row["Usage"] != usage:
                continue
            if not re.fullmatch("[0-9]", row["level"]) or not 0 <= int(row["level"]) <= 4:
                raise DataError(f"{path}:{number}: level {row['level']!r} is not a grade 0-4")
            rows.append((row["image"], int(row["level"])))
    return rows


def read_retinopathy(source: Path) -> Splits:
    """Diabetic Retinopathy (TFDS ``diabetic_retinopathy_detection/btgraham-300`` 3.0.0): key = the image name.

    train = ``trainLabels.csv`` over ``train/``; validation / test = the rows of ``retinopathy_solution.csv``
    whose Usage is Public / Private, over ``test/``. Label = level (0-4). Images get :func:`btgraham_300`.
    Layout: Kaggle's files in ``<source>/diabetic_retinopathy/{train,test}/<name>.jpeg``, ``trainLabels.csv``,
    ``retinopathy_solution.csv``.
    """
    root = require_dir(
        source / "diabetic_retinopathy",
        "Diabetic Retinopathy folder",
        "Kaggle's train/, test/, trainLabels.csv and retinopathy_solution.csv",
    )
    splits = {}
    for split, folder, listed, usage in (
        ("train", "train", "trainLabels.csv", ""),
        ("validation", "test", "retinopathy_solution.csv", "Public"),
        ("test", "test", "retinopathy_solution.csv", "Private"),
    ):
        rows = _read_label_csv(require_file(root / listed, "Diabetic Retinopathy label file", "from Kaggle"), usage)
        files = [root / folder / f"{name}.jpeg" for name, _ in rows]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise DataError(
                f"{root / listed} lists {len(missing)} image(s) missing from {root / folder}, e.g. {str(missing[0])!r}"
            )
        splits[split] = SourceSplit(
            [name for name, _ in rows],
            [level for _, level in rows],
            [f"{name}.jpg" for name, _ in rows],
            decode=lambda i, files=files: btgraham_300(files[i]),
        )
    return splits
