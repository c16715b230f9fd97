"""Users' own data: an ImageFolder tree or a CSV list of ``path,label``."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import List, Optional, Tuple

from .base import ImageClassificationDataModule
from .datasets import DataError, ImageListDataset, Sample, check_samples, require_dir
from .transforms import build_transform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def scan_image_folder(folder: Path, classes: Optional[List[str]] = None) -> Tuple[List[Sample], List[str]]:
    """``folder/<class>/<image>`` -> samples and the sorted class names (given ``classes`` fixes the order)."""
    names = classes or sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not names:
        raise DataError(f"{str(folder)!r} has no class sub-folders (expected {folder}/<class>/<image>)")
    unknown = sorted({d.name for d in folder.iterdir() if d.is_dir()} - set(names))
    if unknown:
        raise DataError(f"{folder}: class folder(s) {unknown} are not among the training classes {names}")
    samples = [
        (path, index)
        for index, name in enumerate(names)
        if (folder / name).is_dir()
        for path in sorted((folder / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    return samples, names


def read_csv_list(path: Path, classes: Optional[List[str]] = None) -> Tuple[List[Sample], List[str]]:
    """A ``path,label`` CSV (header optional; paths relative to the CSV; labels are ints or class names)."""
    if not path.is_file():
        raise DataError(f"list file {str(path)!r} does not exist")
    rows = []
    with open(path, newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or (number == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{number}: expected 'path,label', got {','.join(row)!r}")
            rows.append((number, row[0].strip(), row[1].strip()))
    names = classes or sorted({label for _, _, label in rows}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    index = {name: i for i, name in enumerate(names)}
    samples = []
    for number, rel, label in rows:
        if label not in index:
            raise DataError(f"{path}:{number}: label {label!r} is not one of the classes {names}")
        samples.append((path.parent / rel, index[label]))
    return samples, names


class FolderDataModule(ImageClassificationDataModule):
    """Your own images: ``root/train/<class>/*`` (+ optional ``root/val``, ``root/test``) or CSV lists.

    With ``train_list`` (and optional ``val_list``/``test_list``) CSV files of ``path,label`` are read instead
    of folders. Without a val split, ``val_fraction`` of the training images are drawn (per seed) for validation.
    ``split='tune'`` trains on train, validates on val (and tests on test, else on val); ``final`` trains on
    train+val and tests on test. The ``recipe`` is ``vtab`` (resize) or ``fgvc`` (crop + flip).
    """

    def __init__(self, root: str, train_list: Optional[str] = None, val_list: Optional[str] = None,
                 test_list: Optional[str] = None, val_fraction: float = 0.1, seed: int = 0, recipe: str = "fgvc",
                 interpolation: str = "bilinear", **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = require_dir(Path(root), "data.root")
        self.recipe, self.interpolation, self.val_fraction, self.seed = recipe, interpolation, val_fraction, seed
        self.lists = {"train": train_list, "val": val_list, "test": test_list}
        train, self.classes = self._read("train", None)
        if not train:
            raise DataError(f"{self.root}: the train split is empty")
        self.num_classes = len(self.classes)
        self._train_samples = train

    def _read(self, split: str, classes: Optional[List[str]]) -> List[Sample] | Tuple[List[Sample], List[str]]:
        if self.lists[split]:
            result = read_csv_list(self.root / self.lists[split], classes)
        elif (self.root / split).is_dir():
            result = scan_image_folder(self.root / split, classes)
        elif split == "train":
            raise DataError(f"{self.root}: no 'train/' folder and no data.train_list")
        else:
            result = ([], classes or [])
        return result if classes is None else result[0]

    def _splits(self) -> Tuple[List[Sample], List[Sample], List[Sample]]:
        train, val = list(self._train_samples), self._read("val", self.classes)
        if not val:
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            n_val = max(1, int(round(len(train) * self.val_fraction)))
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
        test = self._read("test", self.classes)
        for name, samples in (("train", train), ("val", val), ("test", test)):
            if samples:
                check_samples(samples, self.num_classes, f"{self.root} {name}")
        return train, val, test

    def setup(self, stage: Optional[str] = None) -> None:
        train, val, test = self._splits()
        mean, std = self.mean_std
        def make(samples, is_train):
            return ImageListDataset(samples, build_transform(self.recipe, is_train, self.img_size, mean, std, self.interpolation))
        if self.split == "tune":
            self.train_dataset, self.val_dataset = make(train, True), make(val, False)
            self.test_dataset = make(test, False) if test else self.val_dataset
        else:
            if not test:
                raise DataError(f"{self.root}: data.split=final needs a test split (root/test/ or data.test_list)")
            self.train_dataset, self.val_dataset, self.test_dataset = make(train + val, True), None, make(test, False)
