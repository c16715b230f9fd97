"""FGVC (CUB, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars) with the official JSON split files."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Optional

from ..runs.atomic import write_json_atomic
from .base import ImageClassificationDataModule
from .datasets import DataError, ImageListDataset, Sample, read_json_object, require_dir
from .registry import get_task
from .transforms import build_transform

# where the images live below the dataset folder, most usual first (paths in the JSON files are relative to it)
IMAGE_DIRS = {
    "cub": ("images",),
    "nabirds": ("images",),
    "oxford_flowers": ("", "jpg"),
    "stanford_dogs": ("Images",),
    "stanford_cars": ("", "car_ims"),
}


def read_split_json(path: Path) -> Dict[str, int]:
    """Read ``{image path: class id}``; errors name the file (and the key of a bad class id)."""
    mapping = read_json_object(path, "FGVC split file", "make train/val with 'vpt-prepare fgvc-split'")
    for key, cid in mapping.items():
        if isinstance(cid, bool) or not isinstance(cid, int):  # bool is an int in Python: reject true/false
            raise DataError(f"{path}: key {key!r} has class id {json.dumps(cid)}; expected an integer class id")
    return mapping


class FGVCDataModule(ImageClassificationDataModule):
    """One FGVC dataset: ``root/<dataset folder>/{train,val,test}.json`` plus its images.

    Splits: ``tune`` = train / val (``trainer.test`` evaluates val too); ``final`` = train+val / test, no
    validation. Class ids of the JSON files (1-based in some releases) are mapped to ``0..C-1`` in sorted order,
    as the official code does; its transforms too: train Resize(256) -> RandomCrop(224) -> horizontal flip;
    eval Resize(256) -> CenterCrop(224) (scaled with ``img_size``).
    """

    recipe = "fgvc"

    def __init__(
        self,
        task: str,
        root: str,
        task_dir: Optional[str] = None,
        image_dir: Optional[str] = None,
        interpolation: str = "bilinear",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.task = get_task(task, benchmark="fgvc")
        self.num_classes = self.task.num_classes
        self.dataset_dir = require_dir(
            Path(root).expanduser() / (task_dir or self.task.folder),
            f"FGVC folder of {self.task.name!r}",
            f"set data.root (now {root!r}) to the folder holding '{self.task.folder}/'",
        )
        self.image_dir = image_dir
        self.interpolation = interpolation

    def _image_root(self, json_file: Path, first_path: str) -> Path:
        candidates = [self.image_dir] if self.image_dir is not None else IMAGE_DIRS[self.task.name]
        for sub in candidates:
            if (self.dataset_dir / sub / first_path).is_file():
                return self.dataset_dir / sub
        tried = [str(self.dataset_dir / sub) for sub in candidates]
        raise DataError(f"{json_file}: image {first_path!r} (the first key) is in none of {tried}; set data.image_dir")

    def _samples(self, *splits: str) -> List[Sample]:
        files = {s: self.dataset_dir / f"{s}.json" for s in ("train", *splits)}
        mappings = {s: read_split_json(f) for s, f in files.items()}
        for split, mapping in mappings.items():
            if not mapping:
                raise DataError(f"{files[split]}: the split is empty")
        train_ids = sorted(set(mappings["train"].values()))
        if len(train_ids) != self.num_classes:
            raise DataError(f"{files['train']}: {len(train_ids)} classes, but {self.task.name} has {self.num_classes}")
        to_index = {cid: i for i, cid in enumerate(train_ids)}
        samples: List[Sample] = []
        for split in splits:
            json_file, mapping = files[split], mappings[split]
            root = self._image_root(json_file, next(iter(mapping)))
            for path, cid in mapping.items():
                if cid not in to_index:
                    raise DataError(
                        f"{json_file}: key {path!r} has class id {cid}, not in train.json "
                        f"(its {len(train_ids)} ids span {train_ids[0]}..{train_ids[-1]})"
                    )
                if not (root / path).is_file():
                    raise DataError(f"{json_file}: key {path!r}: image {str(root / path)!r} does not exist")
                samples.append((root / path, to_index[cid]))
        return samples

    def _dataset(self, train: bool, *splits: str) -> ImageListDataset:
        mean, std = self.mean_std
        return ImageListDataset(
            self._samples(*splits), build_transform(self.recipe, train, self.img_size, mean, std, self.interpolation)
        )

    def setup(self, stage: Optional[str] = None) -> None:
        if self.split == "tune":
            self.train_dataset = self._dataset(True, "train")
            self.val_dataset = self.test_dataset = self._dataset(False, "val")
        else:
            self.train_dataset = self._dataset(True, "train", "val")
            self.val_dataset = None
            self.test_dataset = self._dataset(False, "test")


def make_train_val_split(train_json: Path, out_dir: Path, val_fraction: float = 0.1, seed: int = 42) -> Dict[str, int]:
    """Split a full training mapping into ``train.json`` / ``val.json`` (90/10 by default) with a fixed seed.

    Returns the sizes written. The split is per class (stratified), so every class keeps training images.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    mapping = read_split_json(Path(train_json))
    by_class: Dict[int, List[str]] = {}
    for path, cid in sorted(mapping.items()):
        by_class.setdefault(cid, []).append(path)
    rng = random.Random(seed)
    train, val = {}, {}
    for cid, paths in sorted(by_class.items()):
        rng.shuffle(paths)
        n_val = int(round(len(paths) * val_fraction)) if len(paths) > 1 else 0
        val.update({p: cid for p in paths[:n_val]})
        train.update({p: cid for p in paths[n_val:]})
    out_dir = Path(out_dir)
    write_json_atomic(dict(sorted(train.items())), out_dir / "train.json")
    write_json_atomic(dict(sorted(val.items())), out_dir / "val.json")
    return {"train": len(train), "val": len(val)}
