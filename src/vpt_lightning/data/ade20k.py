"""ADE20K (SceneParsing, ``ADEChallengeData2016``) for semantic segmentation: 150 classes, label 0 ignored.

The official layout, as downloaded (``ADEChallengeData2016.zip``) and as mmsegmentation reads it::

    ADEChallengeData2016/
        images/training/ADE_train_00000001.jpg ...      (20,210)
        images/validation/ADE_val_00000001.jpg ...      (2,000)
        annotations/training/ADE_train_00000001.png ... (uint8, 0 = other / unlabelled, 1..150 = classes)
        annotations/validation/...

Labels are shifted by one (1..150 -> 0..149) and 0 becomes the ignore index 255 (mmsegmentation's
``reduce_zero_label``). Training follows mmsegmentation's ADE20K recipe: random rescale of the (2048, 512) scale by
0.5-2.0 keeping the aspect ratio, random crop (padded with the ignore index where the image is smaller), horizontal
flip and photometric distortion (torchvision's ``RandomPhotometricDistort``). Evaluation rescales the image to the
(2048, 512) scale and keeps the annotation at its original size (the module resizes its logits to it). There are no
public test labels: ``test`` is the validation split.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .base import ImageClassificationDataModule
from .datasets import DataError, require_dir

NUM_CLASSES = 150
IGNORE_INDEX = 255
FOLDER = "ADEChallengeData2016"
SPLIT_DIRS = {"train": "training", "val": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_root(root: Path) -> Path:
    """The ``ADEChallengeData2016`` folder: ``root`` itself or its child of that name."""
    root = require_dir(Path(root), "data.root", "download ADEChallengeData2016.zip and give its folder (or its parent)")
    return root / FOLDER if (root / FOLDER).is_dir() else root


def list_pairs(root: Path, split: str) -> List[Tuple[Path, Path]]:
    """``(image, annotation)`` paths of a split (``train`` or ``val``), matched by file stem; errors name what is
    missing."""
    hint = f"expected the official layout {FOLDER}/images/<training|validation> and annotations/<training|validation>"
    images = require_dir(root / "images" / SPLIT_DIRS[split], "ADE20K image folder", hint)
    annotations = require_dir(root / "annotations" / SPLIT_DIRS[split], "ADE20K annotation folder", hint)
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"ADE20K image folder {str(images)!r} holds no .jpg/.png images")
    pairs = [(image, annotations / f"{image.stem}.png") for image in files]
    missing = [str(a.name) for _, a in pairs if not a.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) of {str(images)!r} have no annotation in {str(annotations)!r} "
            f"(e.g. {missing[:3]}); every images/.../X.jpg needs annotations/.../X.png"
        )
    return pairs


def read_annotation(path: Path) -> np.ndarray:
    """A single-channel uint8 annotation shifted to 0..149 with 255 = ignored (from 0 = unlabelled)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P"):
                raise DataError(
                    f"ADE20K annotation {str(path)!r} has mode {image.mode!r}; expected a single-channel "
                    "(L or P) PNG of class indices 0..150"
                )
            labels = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"ADE20K annotation {str(path)!r} could not be read: {err}") from err
    if labels.size and int(labels.max()) > NUM_CLASSES:
        raise DataError(f"ADE20K annotation {str(path)!r} holds label {int(labels.max())} > {NUM_CLASSES}")
    return (labels.astype(np.int64) - 1) % 256  # 0 -> 255 (ignored), 1..150 -> 0..149


def read_image(path: Path) -> tv_tensors.Image:
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"ADE20K image {str(path)!r} could not be read: {err}") from err
    return tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1))


def rescaled_size(height: int, width: int, scale: Sequence[int], ratio: float = 1.0) -> Tuple[int, int]:
    """mmsegmentation's keep-ratio rescale: the largest size with long side <= ``scale[0] * ratio`` and short side
    <= ``scale[1] * ratio``."""
    long_max, short_max = max(scale) * ratio, min(scale) * ratio
    factor = min(long_max / max(height, width), short_max / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class ADE20KDataset(Dataset):
    """Pairs of a split; items are ``(image (3, H, W) normalised float, mask (H', W') int64)``.

    ``train``: random rescale (``ratio_range``), crop ``crop_size``, flip, photometric distortion; the image and mask
    are both ``crop_size``. Eval: the image rescaled to ``scale``, the mask at its original size.
    """

    def __init__(
        self,
        pairs: Sequence[Tuple[Path, Path]],
        train: bool,
        crop_size: int,
        scale: Sequence[int],
        ratio_range: Sequence[float],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.pairs, self.train, self.crop_size, self.scale = list(pairs), train, crop_size, tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.augment = v2.Compose(
            [
                v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
                v2.RandomHorizontalFlip(),
                v2.RandomPhotometricDistort(),
            ]
        )
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        mask = tv_tensors.Mask(torch.from_numpy(read_annotation(mask_path)))
        if image.shape[-2:] != mask.shape[-2:]:
            raise DataError(
                f"ADE20K image {str(image_path)!r} is {tuple(image.shape[-2:])} but its annotation is "
                f"{tuple(mask.shape[-2:])}"
            )
        if self.train:
            size = rescaled_size(*image.shape[-2:], self.scale, random.uniform(*self.ratio_range))
            image = v2.functional.resize(image, list(size), interpolation=v2.InterpolationMode.BILINEAR)
            mask = v2.functional.resize(mask, list(size), interpolation=v2.InterpolationMode.NEAREST)
            image, mask = self.augment(image, mask)
        else:
            size = rescaled_size(*image.shape[-2:], self.scale)
            image = v2.functional.resize(image, list(size), interpolation=v2.InterpolationMode.BILINEAR)
        return self.normalize(image).as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


class ADE20KDataModule(ImageClassificationDataModule):
    """ADE20K on the official ``ADEChallengeData2016`` layout (see the module docstring).

    Args:
        root: the ``ADEChallengeData2016`` folder or its parent.
        crop_size: training crop (512); the module's sliding window should match the backbone's input size.
        scale: ``(long, short)`` rescale target (2048, 512).
        ratio_range: random rescale factors of ``scale`` while training (0.5, 2.0).
        eval_batch_size: keep 1 (validation images differ in size) unless every image has the same size.
        Other arguments: those of :class:`~vpt_lightning.data.base.ImageClassificationDataModule`.
    """

    num_classes = NUM_CLASSES
    ignore_index = IGNORE_INDEX
    task_group = "segmentation"

    def __init__(
        self,
        root: str,
        crop_size: int = 512,
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        **kwargs,
    ) -> None:
        kwargs.setdefault("eval_batch_size", 1)
        super().__init__(**kwargs)
        if self.split != "tune":
            raise ValueError(
                f"data.split={self.split!r}: ADE20K trains on training and evaluates on validation (split='tune' only)"
            )
        if crop_size < 1 or len(scale) != 2 or len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(
                f"ADE20K: crop_size={crop_size}, scale={list(scale)}, ratio_range={list(ratio_range)} "
                "must be a positive crop, (long, short) and (low <= high)"
            )
        self.root, self.crop_size, self.scale, self.ratio_range = root, crop_size, tuple(scale), tuple(ratio_range)

    def _dataset(self, split: str, train: bool) -> ADE20KDataset:
        mean, std = self.mean_std
        pairs = list_pairs(find_root(Path(self.root)), split)
        return ADE20KDataset(pairs, train, self.crop_size, self.scale, self.ratio_range, mean, std)

    @property
    def has_validation_set(self) -> bool:
        """ADE20K validates (and tests) on its val split in both modes."""
        return True

    def setup(self, stage: Optional[str] = None) -> None:
        self.train_dataset = self._dataset("train", train=True)
        self.val_dataset = self._dataset("val", train=False)
        self.test_dataset = self.val_dataset
