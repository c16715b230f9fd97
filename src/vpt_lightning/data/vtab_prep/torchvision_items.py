"""What torchvision's classification datasets keep per item, read without decoding an image.

``vpt-prepare vtab`` uses it to copy the original image files (no re-encoding) with their labels, and to match the
file names of a given split against the files torchvision reads. Datasets kept as arrays (CIFAR, SVHN, Patch
Camelyon) have no files: :func:`item_files` returns ``None`` for them and the caller decodes items instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from torch.utils.data import ConcatDataset


def item_files(dataset: Any) -> Optional[List[str]]:
    """The image file of each item (posix paths), or ``None`` when the dataset keeps its images in arrays."""
    if isinstance(dataset, ConcatDataset):
        parts = [item_files(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [f for p in parts for f in p]
    if hasattr(dataset, "samples"):  # ImageFolder (EuroSAT)
        return [Path(p).as_posix() for p, _ in dataset.samples]
    for attr in ("_image_files", "_images"):  # DTD, Flowers102, SUN397, CLEVR / Oxford-IIIT Pet
        if hasattr(dataset, attr):
            return [Path(p).as_posix() for p in getattr(dataset, attr)]
    if all(hasattr(dataset, a) for a in ("root", "categories", "y", "index")):  # Caltech101
        folder = Path(dataset.root) / "101_ObjectCategories"
        return [
            (folder / dataset.categories[y] / f"image_{i:04d}.jpg").as_posix() for y, i in zip(dataset.y, dataset.index)
        ]
    return None


def item_labels(dataset: Any) -> Optional[List[int]]:
    """The label of each item, or ``None`` when the dataset keeps no label list (then decode items)."""
    if isinstance(dataset, ConcatDataset):
        parts = [item_labels(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [label for p in parts for label in p]
    for attr in ("targets", "_labels", "y", "labels"):  # ImageFolder/CIFAR, DTD/Flowers/SUN/CLEVR/Pets, Caltech, SVHN
        labels = getattr(dataset, attr, None)
        if labels is not None and len(labels) == len(dataset) and all(v is not None for v in labels):
            return [int(v) for v in labels]
    return None
