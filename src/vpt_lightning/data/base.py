"""The DataModule base class shared by every dataset of the package."""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

import pytorch_lightning as pl
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from ..runs.resume import EpochRandomSampler
from .transforms import NORMALIZATIONS, resolve_normalization

SPLITS = ("tune", "final")


def default_num_workers(processes_per_node: int = 1) -> int:
    """A sensible default worker count: the CPUs this process may use shared by the processes of the node, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus // max(1, processes_per_node)))


def require_count(key: str, value: Any, minimum: int = 0, what: str = "") -> int:
    """``value`` as an int of at least ``minimum``, or a ``ValueError`` naming ``key`` and what is valid."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} must be an integer >= {minimum}" + (f" {what}" if what else ""))
    return value


class ImageClassificationDataModule(pl.LightningDataModule):
    """Base class: holds the split mode, loader settings and normalisation; subclasses build datasets.

    Contract for subclasses:
    - ``num_classes`` is known after ``__init__`` (from the task registry or a cheap scan).
    - ``setup(stage)`` fills ``self.train_dataset``, ``self.val_dataset`` (may stay ``None``) and
      ``self.test_dataset``; each item is ``(image_tensor, int_label)``.
    - ``split`` is ``'tune'`` (train on the train split, validate on val) or ``'final'`` (train on train+val,
      test on test).

    The backbone's timm data config (``VPTModule.data_config``) can be passed as ``backbone_data_config`` or
    assigned to that attribute before ``setup``; it supplies the input size when ``img_size`` is ``None`` and
    the mean/std when ``normalization='backbone'``. Lightning inserts a ``DistributedSampler`` under DDP.
    """

    num_classes: int
    task_group: Optional[str] = None  # e.g. the VTAB group; reports average the tasks of a group

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: Optional[int] = None,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        split: str = "tune",
        img_size: Optional[int] = None,
        normalization: str = "imagenet",
        backbone_data_config: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"data.split={split!r} is not one of {list(SPLITS)}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"data.normalization={normalization!r} is not one of {list(NORMALIZATIONS)}")
        require_count("data.batch_size", batch_size, minimum=1)
        if eval_batch_size is not None:
            require_count("data.eval_batch_size", eval_batch_size, minimum=1, what="(or null: data.batch_size)")
        if img_size is not None:
            require_count("data.img_size", img_size, minimum=1, what="(or null: the backbone's input size)")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0 (or null for the default)")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers  # None: resolved per loader, see loader_workers()
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.split = split
        self._img_size = img_size
        self.normalization = normalization
        self.backbone_data_config = dict(backbone_data_config) if backbone_data_config else None
        self.train_dataset: Optional[Dataset] = None
        self.val_dataset: Optional[Dataset] = None
        self.test_dataset: Optional[Dataset] = None

    @property
    def img_size(self) -> int:
        """Square input size: ``img_size`` if given, else the backbone's, else 224."""
        if self._img_size:
            return int(self._img_size)
        if self.backbone_data_config and "input_size" in self.backbone_data_config:
            return int(self.backbone_data_config["input_size"][-1])
        return 224

    @property
    def has_validation_set(self) -> bool:
        """Whether ``setup`` fills ``val_dataset``: the ``'tune'`` split does, ``'final'`` (which trains on
        train+val) does not. The training run turns validation off (``limit_val_batches=0``) when it does not."""
        return self.split == "tune"

    @property
    def deterministic_train_transform(self) -> bool:
        """Whether a training image always gives the same tensor (no random augmentation). Then head-only methods
        may train on cached backbone features (:mod:`vpt_lightning.runs.feature_cache`). Default ``False`` (safe)."""
        return False

    @property
    def mean_std(self):
        """``(mean, std)`` used by the Normalize transform."""
        return resolve_normalization(self.normalization, self.backbone_data_config)

    def eval_transform_config(self) -> Dict[str, Any]:
        """The evaluation transform's settings (:func:`~vpt_lightning.data.transforms.build_transform` arguments),
        saved in task checkpoints so that ``vpt-predict`` / ``vpt-serve`` prepare image files the same way."""
        mean, std = self.mean_std
        return {
            "recipe": getattr(self, "recipe", "vtab"),
            "img_size": self.img_size,
            "interpolation": getattr(self, "interpolation", "bicubic"),
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
        }

    def loader_workers(self) -> int:
        """``num_workers``, or when ``None`` the CPUs shared by the node's processes (``trainer.num_devices``), at
        most 8."""
        if self.num_workers is not None:
            return self.num_workers
        return default_num_workers(self.trainer.num_devices if self.trainer is not None else 1)

    def _loader(self, dataset: Optional[Dataset], train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: no dataset for this stage (split={self.split!r})")
        pin = self.pin_memory
        if pin is None:
            pin = self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
        sampler = None
        if not train and self.trainer is not None and self.trainer.world_size > 1:
            # Lightning's default eval sampler pads the last batch with repeated samples; this one does not,
            # so every val/test sample is counted exactly once (torchmetrics syncs the uneven shards).
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        if train:  # epoch e's order depends only on (seed, e): exact on resume (Lightning calls set_epoch)
            sampler = EpochRandomSampler(dataset)
        workers = self.loader_workers()
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            generator=sampler.generator if train else None,
            drop_last=False,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=self.persistent_workers and workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self):
        # no validation set (e.g. a 'final' split without val): an empty list makes Lightning skip validation
        return [] if self.val_dataset is None else self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)
