"""A procedurally generated segmentation task (offline): label every pixel with the kind of shape covering it.

Scenes are those of :mod:`vpt_lightning.data.synthetic` (1-4 coloured shapes of six kinds over a textured
background, later shapes on top); the mask holds 0 for background and ``1 + kind`` under each shape (7 classes).
Image ``i`` of a split depends only on ``(seed, i)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import ImageClassificationDataModule, require_count
from .synthetic import KINDS, Shape, _random_shapes, _shape_mask, render

IGNORE_INDEX = 255
NUM_CLASSES = 1 + len(KINDS)


def shape_label_mask(shapes: list[Shape], size: int) -> np.ndarray:
    """``(size, size)`` uint8 labels: 0 = background, ``1 + kind`` where a shape is drawn (later ones on top)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    mask = np.zeros((size, size), dtype=np.uint8)
    for shape in shapes:
        mask[_shape_mask(shape, yy, xx)] = 1 + shape.kind
    return mask


class ShapeSegmentationDataset(Dataset):
    """``num_samples`` scenes; items are ``(image (3, size, size) normalised, mask (size, size) int64)``."""

    def __init__(
        self, num_samples: int, seed: int, img_size: int = 32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    ) -> None:
        self.num_samples, self.seed, self.img_size = num_samples, seed, img_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The raw image ``(size, size, 3)`` in [0, 1] and its label mask."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        shapes = _random_shapes(rng, int(rng.integers(1, 5)), self.img_size, (0.15, 0.35))
        return render(shapes, rng, self.img_size), shape_label_mask(shapes, self.img_size)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.sample(index)
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return (tensor - self.mean) / self.std, torch.from_numpy(mask.astype(np.int64))


class ShapeSegmentationDataModule(ImageClassificationDataModule):
    """The shape-segmentation task as a DataModule: disjoint train / val / test draws (different seeds).

    ``split='final'`` trains on train+val and validates on nothing, as for classification.
    """

    num_classes = NUM_CLASSES
    ignore_index = IGNORE_INDEX
    task_group = "segmentation"

    def __init__(self, num_train: int = 1000, num_val: int = 200, num_test: int = 200, seed: int = 0, **kwargs) -> None:
        kwargs.setdefault("img_size", 32)
        super().__init__(**kwargs)
        self.num_train = require_count("data.num_train", num_train, minimum=1)
        # 'final' trains on train + val: no val images is then valid
        self.num_val = require_count("data.num_val", num_val, minimum=1 if self.split == "tune" else 0)
        self.num_test = require_count("data.num_test", num_test, minimum=1)
        self.seed = seed

    def _dataset(self, count: int, offset: int) -> ShapeSegmentationDataset:
        mean, std = self.mean_std
        return ShapeSegmentationDataset(count, self.seed * 1000 + offset, self.img_size, mean, std)

    def setup(self, stage: Optional[str] = None) -> None:
        train, val = self._dataset(self.num_train, 1), self._dataset(self.num_val, 2)
        if self.split == "tune":
            self.train_dataset, self.val_dataset = train, val
        else:
            self.train_dataset, self.val_dataset = torch.utils.data.ConcatDataset([train, val]), None
        self.test_dataset = self._dataset(self.num_test, 3)
