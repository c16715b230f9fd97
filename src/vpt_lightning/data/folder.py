"""Users' own data: an ImageFolder tree or a CSV list of ``path,label``."""

from __future__ import annotations

import csv
import io
import random
import re
from pathlib import Path
from typing import List, Optional, Tuple

from .base import ImageClassificationDataModule
from .datasets import DataError, ImageListDataset, Sample, read_index_text, require_dir
from .transforms import build_transform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
INTEGER = re.compile(r"-?\d+")


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
    """A ``path,label`` CSV (header optional; paths relative to the CSV); errors name the file and line.

    Without ``classes`` (the train list): integer labels are class ids (classes ``"0".."max"``), anything else
    class names (sorted). Given ``classes`` (val/test lists) the labels must be among them.
    """
    rows = []
    reader = csv.reader(io.StringIO(read_index_text(path, "list file"), newline=""))
    try:
        for row in reader:
            number = reader.line_num
            if not row or (number == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{number}: expected 'path,label', got {','.join(row)!r}")
            rows.append((number, row[0].strip(), row[1].strip()))
    except csv.Error as err:  # a field over the csv module's limit, a NUL byte
        raise DataError(f"{path}:{reader.line_num}: {err}") from None
    labels = {label for _, _, label in rows}
    if classes is None and labels and all(INTEGER.fullmatch(label) for label in labels):
        classes = [str(i) for i in range(max(0, max(int(label) for label in labels)) + 1)]
    names = classes or sorted(labels, key=lambda s: (0, int(s), s) if INTEGER.fullmatch(s) else (1, 0, s))
    ids = names == [str(i) for i in range(len(names))]  # class ids: "02" is class 2
    index = {name: i for i, name in enumerate(names)}
    samples = []
    for number, rel, label in rows:
        key = str(int(label)) if ids and INTEGER.fullmatch(label) else label
        if key not in index:
            valid = f"a class id in [0, {len(names)})" if ids else f"one of the training classes {names}"
            raise DataError(f"{path}:{number}: label {label!r} is not {valid}")
        if not (path.parent / rel).is_file():
            raise DataError(f"{path}:{number}: image {str(path.parent / rel)!r} does not exist")
        samples.append((path.parent / rel, index[key]))
    return samples, names


class FolderDataModule(ImageClassificationDataModule):
    """Your own images: ``root/train/<class>/*`` (+ optional ``root/val``, ``root/test``) or CSV lists.

    With ``train_list`` (and optional ``val_list``/``test_list``) CSV files of ``path,label`` are read instead
    of folders. Without a val split, ``val_fraction`` (in (0, 1)) of the training images are drawn (per seed) for
    validation in ``tune``. Integer CSV labels are class ids, other labels class names (see :func:`read_csv_list`).
    ``split='tune'`` trains on train, validates on val (and tests on test, else on val); ``final`` trains on
    train+val and tests on test. The ``recipe`` is ``vtab`` (resize) or ``fgvc`` (crop + flip).
    """

    def __init__(
        self,
        root: str,
        train_list: Optional[str] = None,
        val_list: Optional[str] = None,
        test_list: Optional[str] = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        recipe: str = "fgvc",
        interpolation: str = "bilinear",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"data.val_fraction={val_fraction} must be in (0, 1): the share of train drawn for validation"
            )
        self.root = require_dir(Path(root), "data.root")
        self.recipe, self.interpolation, self.val_fraction, self.seed = recipe, interpolation, val_fraction, seed
        self.lists = {"train": train_list, "val": val_list, "test": test_list}
        self._train_samples, self.classes = self._read("train", None)
        self.num_classes = len(self.classes)

    @property
    def deterministic_train_transform(self) -> bool:
        """``recipe=vtab`` only resizes; ``fgvc`` crops and flips at random."""
        return self.recipe == "vtab"

    def _source(self, split: str) -> Optional[Path]:
        """The CSV list or folder of ``split`` (``None``: the split is absent)."""
        if self.lists[split]:
            return self.root / self.lists[split]
        return self.root / split if (self.root / split).is_dir() else None

    def _read(self, split: str, classes: Optional[List[str]]) -> Tuple[List[Sample], List[str]]:
        source = self._source(split)
        if source is None:
            if split == "train":
                raise DataError(f"{self.root}: no 'train/' folder and no data.train_list")
            return [], classes or []
        samples, names = (read_csv_list if self.lists[split] else scan_image_folder)(source, classes)
        if not samples:
            found = "no rows" if self.lists[split] else f"no {'/'.join(IMAGE_SUFFIXES)} files in its class folders"
            raise DataError(f"{source}: the {split} split is empty ({found})")
        return samples, names

    def _splits(self) -> Tuple[List[Sample], List[Sample], List[Sample]]:
        train, (val, _) = list(self._train_samples), self._read("val", self.classes)
        if not val and self.split == "tune":  # 'final' trains on train+val anyway
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            n_val = max(1, int(round(len(train) * self.val_fraction)))
            if n_val >= len(train):
                raise DataError(
                    f"{self._source('train')}: {len(train)} training image(s) with "
                    f"data.val_fraction={self.val_fraction} leave none for training; add images or a val split "
                    "(root/val/ or data.val_list)"
                )
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
        return train, val, self._read("test", self.classes)[0]

    def setup(self, stage: Optional[str] = None) -> None:
        train, val, test = self._splits()
        mean, std = self.mean_std

        def make(samples, is_train):
            return ImageListDataset(
                samples, build_transform(self.recipe, is_train, self.img_size, mean, std, self.interpolation)
            )

        if self.split == "tune":
            self.train_dataset, self.val_dataset = make(train, True), make(val, False)
            self.test_dataset = make(test, False) if test else self.val_dataset
        else:
            if not test:
                raise DataError(f"{self.root}: data.split=final needs a test split (root/test/ or data.test_list)")
            self.train_dataset, self.val_dataset, self.test_dataset = make(train + val, True), None, make(test, False)
