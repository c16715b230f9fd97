"""Procedurally generated image tasks: offline data for the quickstart (and tests).

Every image is drawn from a seed and its index, so a dataset is fully reproducible, needs no files and no
network. Scenes hold 1-5 coloured shapes (six kinds) over a textured background. Tasks:

- ``shapes`` (upstream, used to pretrain the quickstart backbone): kind of the largest shape x its colour
  (36 classes), 1-3 shapes.
- ``kind``: the kind of a single shape of any size and colour (6 classes): natural-like, close to the upstream
  question, as VTAB's natural tasks are close to ImageNet.
- ``count``: how many shapes, 1-5 (5 classes): structured, like CLEVR/count.
- ``location``: the 3x3 grid cell holding the single shape (9 classes): structured, like dSprites/location.
- ``orientation``: the angle of a single bar, in 8 bins of 22.5 degrees (8 classes): like dSprites/orientation.
  The angle is measured from the horizontal (pointing right) clockwise on screen (image rows grow downward),
  modulo 180: a bar from top-left to bottom-right is 45 degrees (class ``45-67.5 deg`` starts there), one from
  bottom-left to top-right 135 degrees; an angle ``t`` counted counter-clockwise is ``180 - t`` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import ImageClassificationDataModule, require_count

KINDS = ("disc", "square", "triangle", "cross", "ring", "diamond")
BAR = len(KINDS)  # an elongated bar, only in the orientation task (a square has 90-degree symmetry)
COLORS = np.array(
    [[0.9, 0.15, 0.1], [0.1, 0.75, 0.2], [0.15, 0.3, 0.95], [0.95, 0.85, 0.1], [0.8, 0.2, 0.85], [0.1, 0.85, 0.9]],
    dtype=np.float32,
)


@dataclass
class Shape:
    kind: int
    color: int
    cx: float
    cy: float
    radius: float
    angle: float


def _shape_mask(shape: Shape, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape on a pixel grid (coordinates in pixels)."""
    c, s = np.cos(shape.angle), np.sin(shape.angle)
    dx, dy = xx - shape.cx, yy - shape.cy
    u, v = (c * dx + s * dy) / shape.radius, (-s * dx + c * dy) / shape.radius
    if shape.kind == BAR:
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.22)
    kind = KINDS[shape.kind]
    if kind == "disc":
        return u * u + v * v <= 1.0
    if kind == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if kind == "triangle":
        return (v <= 0.7) & (v >= 1.7 * np.abs(u) - 0.9)
    if kind == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if kind == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.35)
    return np.abs(u) + np.abs(v) <= 1.0  # diamond


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field plus fine noise (a cheap 'natural' texture)."""
    coarse = rng.uniform(0.0, 0.55, size=(3, 4, 4)).astype(np.float32)
    grid = np.linspace(0, 3, size, dtype=np.float32)
    i0 = np.clip(grid.astype(int), 0, 2)
    t = grid - i0
    rows = coarse[:, i0] * (1 - t)[None, :, None] + coarse[:, i0 + 1] * t[None, :, None]
    field = rows[:, :, i0] * (1 - t)[None, None, :] + rows[:, :, i0 + 1] * t[None, None, :]
    return field.transpose(1, 2, 0) + rng.normal(0, 0.04, size=(size, size, 3)).astype(np.float32)


def render(shapes: List[Shape], rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw ``shapes`` (in order, later on top) over a random background: ``(size, size, 3)`` in [0, 1]."""
    image = _background(rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for shape in shapes:
        mask = _shape_mask(shape, yy, xx)
        shade = COLORS[shape.color] * rng.uniform(0.8, 1.0)
        image[mask] = shade
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _random_shapes(rng: np.random.Generator, count: int, size: int, radius: Tuple[float, float]) -> List[Shape]:
    """``count`` shapes at random places, avoiding heavy overlap (so counts stay countable)."""
    shapes: List[Shape] = []
    for _ in range(200):
        if len(shapes) == count:
            break
        r = rng.uniform(*radius) * size
        cx, cy = rng.uniform(r, size - r, size=2)
        if all((cx - o.cx) ** 2 + (cy - o.cy) ** 2 > (r + o.radius) ** 2 * 0.8 for o in shapes):
            shapes.append(Shape(int(rng.integers(6)), int(rng.integers(6)), cx, cy, r, rng.uniform(0, np.pi)))
    while len(shapes) < count:  # crowded: accept overlap rather than loop forever
        r = radius[0] * size
        cx, cy = rng.uniform(r, size - r, size=2)
        shapes.append(Shape(int(rng.integers(6)), int(rng.integers(6)), cx, cy, r, rng.uniform(0, np.pi)))
    return shapes


def _task_shapes(rng, size):
    shapes = _random_shapes(rng, int(rng.integers(1, 4)), size, (0.15, 0.35))
    largest = max(shapes, key=lambda s: s.radius)
    shapes.sort(key=lambda s: s is largest)  # the labelled shape is drawn last, never hidden
    return shapes, largest.kind * 6 + largest.color


def _task_kind(rng, size):
    shape = _random_shapes(rng, 1, size, (0.12, 0.35))[0]
    return [shape], shape.kind


def _task_count(rng, size):
    count = int(rng.integers(1, 6))
    return _random_shapes(rng, count, size, (0.09, 0.15)), count - 1


def _task_location(rng, size):
    cell = int(rng.integers(9))
    r = rng.uniform(0.1, 0.15) * size
    third = size / 3
    cx = (cell % 3 + rng.uniform(0.3, 0.7)) * third
    cy = (cell // 3 + rng.uniform(0.3, 0.7)) * third
    return [Shape(int(rng.integers(6)), int(rng.integers(6)), cx, cy, r, rng.uniform(0, np.pi))], cell


def _task_orientation(rng, size):
    label = int(rng.integers(8))
    angle = (label + rng.uniform(0.1, 0.9)) * np.pi / 8
    r = rng.uniform(0.3, 0.42) * size
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08, size=2) * size
    bar = Shape(BAR, int(rng.integers(6)), cx, cy, r, angle)
    return [bar], label


COLOR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
CELLS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")


@dataclass(frozen=True)
class SyntheticTask:
    name: str
    num_classes: int
    make: Callable[[np.random.Generator, int], Tuple[List[Shape], int]]
    group: str  # the VTAB group it resembles (reports average per group), or 'upstream'
    classes: Tuple[str, ...]  # class names in label order


SYNTHETIC_TASKS: Dict[str, SyntheticTask] = {
    t.name: t
    for t in (
        SyntheticTask("shapes", 36, _task_shapes, "upstream", tuple(f"{c} {k}" for k in KINDS for c in COLOR_NAMES)),
        SyntheticTask("kind", 6, _task_kind, "natural", KINDS),
        SyntheticTask("count", 5, _task_count, "structured", tuple(str(n) for n in range(1, 6))),
        SyntheticTask("location", 9, _task_location, "structured", CELLS),
        SyntheticTask(
            "orientation",
            8,
            _task_orientation,
            "structured",
            tuple(f"{22.5 * b:g}-{22.5 * (b + 1):g} deg" for b in range(8)),
        ),
    )
}


def get_synthetic_task(name: str) -> SyntheticTask:
    if name not in SYNTHETIC_TASKS:
        raise ValueError(f"synthetic task {name!r} is not one of {sorted(SYNTHETIC_TASKS)}")
    return SYNTHETIC_TASKS[name]


class SyntheticDataset(Dataset):
    """``num_samples`` images of a synthetic task; image ``i`` depends only on ``(seed, i)``.

    Items are ``(tensor (3, size, size) normalised with mean/std, int label)``.
    """

    def __init__(
        self,
        task: str,
        num_samples: int,
        seed: int,
        img_size: int = 32,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    ) -> None:
        self.task = get_synthetic_task(task)
        self.num_samples = num_samples
        self.seed = seed
        self.img_size = img_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> Tuple[np.ndarray, int]:
        """The raw image ``(size, size, 3)`` in [0, 1] and its label."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        shapes, label = self.task.make(rng, self.img_size)
        return render(shapes, rng, self.img_size), label

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image, label = self.sample(index)
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return (tensor - self.mean) / self.std, label


class SyntheticDataModule(ImageClassificationDataModule):
    """A synthetic task as a DataModule with disjoint train / val / test draws.

    ``split='tune'``: train on ``num_train``, validate on ``num_val``, test on ``num_test``; ``final``: train on
    train+val (the same images), validate on nothing, test on ``num_test``. Train, val and test images come
    from different seeds, so they never overlap.
    """

    def __init__(
        self,
        task: str = "location",
        num_train: int = 800,
        num_val: int = 200,
        num_test: int = 1000,
        seed: int = 0,
        **kwargs,
    ) -> None:
        kwargs.setdefault("img_size", 32)
        super().__init__(**kwargs)
        self.task = get_synthetic_task(task)
        self.num_classes = self.task.num_classes
        self.classes = list(self.task.classes)
        self.task_group = self.task.group
        self.num_train = require_count("data.num_train", num_train, minimum=1)
        # 'final' trains on train + val: no val images is then valid
        self.num_val = require_count("data.num_val", num_val, minimum=1 if self.split == "tune" else 0)
        self.num_test = require_count("data.num_test", num_test, minimum=1)
        self.seed = seed

    @property
    def deterministic_train_transform(self) -> bool:
        """Image ``i`` depends only on ``(seed, i)``: no augmentation."""
        return True

    def _dataset(self, count: int, offset: int) -> SyntheticDataset:
        mean, std = self.mean_std
        return SyntheticDataset(self.task.name, count, self.seed * 1000 + offset, self.img_size, mean, std)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.split == "tune":
            self.train_dataset = self._dataset(self.num_train, 1)
            self.val_dataset = self._dataset(self.num_val, 2)
        else:
            train, val = self._dataset(self.num_train, 1), self._dataset(self.num_val, 2)
            self.train_dataset = torch.utils.data.ConcatDataset([train, val])
            self.val_dataset = None
        self.test_dataset = self._dataset(self.num_test, 3)
