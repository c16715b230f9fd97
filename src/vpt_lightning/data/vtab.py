"""VTAB-1k in the common TensorFlow-free layout: one folder per task with four list files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .base import ImageClassificationDataModule
from .datasets import ImageListDataset, read_list_file, require_dir
from .registry import get_task
from .transforms import build_transform
from .vtab_prep.sources import EXACT_SOURCES

LIST_FILES = {"train": "train800.txt", "val": "val200.txt", "trainval": "train800val200.txt", "test": "test.txt"}


def build_hint(task: str, root: Path) -> str:
    """How to get a missing task folder with ``vpt-prepare vtab``, and where its source files come from."""
    how = (
        f"its source: {EXACT_SOURCES[task].get}"
        if task in EXACT_SOURCES
        else "torchvision's copy (add --download), with --official-splits vtab_trainval_splits.json or a seeded re-draw"
    )
    return f"or build it with 'vpt-prepare vtab --tasks {task} --source SOURCE_ROOT --out {root}' ({how})"


class VTABDataModule(ImageClassificationDataModule):
    """One VTAB-1k task read from ``root/<task folder>/{train800,val200,train800val200,test}.txt``.

    Each list line is ``relative/path label``, relative to the task folder. Splits:

    - ``split='tune'``: train on train800, validate on val200; ``trainer.test`` also evaluates val200 (the
      hyper-parameter search never touches the test set).
    - ``split='final'``: train on train800val200, test on the full test set, and no validation (val200 is part
      of the training data then, so it would only measure training fit).

    Transforms (the paper's VTAB recipe): resize straight to ``img_size`` (no crop, no augmentation), then
    normalise. ``interpolation='bicubic'`` by default, as the common TF-free VTAB-1k loaders (NOAH, SSF) do;
    the official code's TensorFlow pipeline resized bilinearly: ``data.interpolation=bilinear`` for that.
    """

    def __init__(
        self,
        task: str,
        root: str,
        task_dir: Optional[str] = None,
        interpolation: str = "bicubic",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.task = get_task(task, benchmark="vtab")
        self.num_classes = self.task.num_classes
        self.task_group = self.task.group
        self.root = Path(root).expanduser()
        self.task_dir = self.root / (task_dir or self.task.folder)
        self.interpolation = interpolation
        if not self.task_dir.is_dir():
            require_dir(
                self.task_dir,
                f"VTAB-1k folder of task {self.task.name!r}",
                f"set data.root (now {str(self.root)!r}) to the folder holding '{self.task.folder}/'; "
                + build_hint(self.task.name, self.root),
            )

    @property
    def deterministic_train_transform(self) -> bool:
        """The VTAB recipe only resizes: a training image is a pure function of its file."""
        return True

    def _dataset(self, split: str, train: bool) -> ImageListDataset:
        samples = read_list_file(self.task_dir / LIST_FILES[split], self.task_dir, self.num_classes)
        mean, std = self.mean_std
        transform = build_transform("vtab", train, self.img_size, mean, std, self.interpolation)
        return ImageListDataset(samples, transform)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.split == "tune":
            self.train_dataset = self._dataset("train", train=True)
            self.val_dataset = self._dataset("val", train=False)
            self.test_dataset = self.val_dataset
        else:
            self.train_dataset = self._dataset("trainval", train=True)
            self.val_dataset = None
            self.test_dataset = self._dataset("test", train=False)
