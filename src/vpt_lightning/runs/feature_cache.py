"""Head-only training on cached features: the frozen backbone's pooled features, computed once per data split.

For a method that trains only a head on a frozen, prompt-free backbone (``linear``, ``mlp``: ``head_only`` in the
registry) and data whose training transform has no randomness (VTAB-1k's resize, the synthetic tasks), the head's
input is a pure function of the image. :func:`cached_datamodule` computes the pooled features of each split once,
stores them under a key of (backbone identity, split contents, transform) and serves them from then on to every
epoch, grid point and seed as a :class:`FeatureDataModule`; the :class:`~vpt_lightning.VPTModule` then skips its
backbone (``inputs_are_features``). Training is still Lightning's, so metrics, checkpoints and ``results.json`` keep
their form. A changed backbone, split or transform gives another key, hence a fresh computation; files are written
atomically, so a crash never leaves half a cache, and a write that fails (a full disk) is logged while training
goes on with the features in memory. :func:`cache_refusal` says why a run cannot use it (augmenting
transforms, prompts, trained backbone weights...), and ``vpt-train`` logs that reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from .atomic import atomic_path
from .resume import EpochRandomSampler

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


# ---- what a cached split depends on -------------------------------------------------------------------------
def _describe(value: Any) -> Any:
    """A process-independent description of a dataset attribute (no memory addresses)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _describe(v) for k, v in sorted(value.items())}
    name = getattr(value, "name", None)
    return f"{type(value).__qualname__}:{name}" if isinstance(name, str) else type(value).__qualname__


def dataset_fingerprint(dataset: Dataset) -> str:
    """A digest of what a dataset yields: its class, its transform's ``repr``, its settings, and for image lists
    every file's path, label, size and modification time (so a replaced file invalidates the cache)."""
    digest = hashlib.sha256()

    def visit(ds: Any) -> None:
        digest.update(type(ds).__qualname__.encode())
        if isinstance(ds, ConcatDataset):
            for part in ds.datasets:
                visit(part)
            return
        if isinstance(ds, Subset):
            digest.update(json.dumps([int(i) for i in ds.indices]).encode())
            visit(ds.dataset)
            return
        for path, label in getattr(ds, "samples", None) or []:
            stat = os.stat(path)
            digest.update(f"{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        digest.update(repr(getattr(ds, "transform", None)).encode())
        settings = {k: _describe(v) for k, v in sorted(vars(ds).items()) if k not in ("samples", "transform")}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())

    visit(dataset)
    return digest.hexdigest()


def cache_key(identity: Mapping[str, Any], dataset: Dataset) -> str:
    """The file name stem of a split's features: backbone identity (weights digest, architecture) x split contents."""
    backbone = {k: identity.get(k) for k in ("weights_sha256", "fingerprint", "embed_dim", "depth", "architecture")}
    payload = json.dumps(
        {"v": FORMAT_VERSION, "backbone": backbone, "data": dataset_fingerprint(dataset)}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# ---- computing and storing --------------------------------------------------------------------------------
@torch.no_grad()
def compute_features(
    backbone: nn.Module, dataset: Dataset, batch_size: int, num_workers: int = 0, device: Optional[torch.device] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The backbone's pooled features (float32, on the CPU) and the labels of every item, in dataset order."""
    device = device or next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    # the loader draws its base seed from the global RNG: keep the RNG where training expects it
    with torch.random.fork_rng(devices=[]):
        for images, targets in loader:
            features.append(backbone(images.to(device)).float().cpu())
            labels.append(torch.as_tensor(targets, dtype=torch.long))
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


class FeatureCache:
    """A folder of cached splits, one ``<key>.pt`` file each (features, labels and what the key was made of)."""

    def __init__(self, root: os.PathLike) -> None:
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The cached split, or ``None`` when absent or unreadable (then it is computed again)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("key") != key:
                raise ValueError("the file's key does not match its name")
            return stored["features"], stored["labels"]
        except Exception as err:  # a foreign or damaged file: recompute rather than fail
            log.warning("feature cache %s is unreadable (%s): computing it again", path, err)
            return None

    def store(self, key: str, features: torch.Tensor, labels: torch.Tensor) -> Optional[Path]:
        """Write a split's features; ``None`` when the write fails (a full disk, a read-only folder): the failure
        is logged and the caller trains on the features in memory, without the cache."""
        path = self.path(key)
        try:
            with atomic_path(path) as tmp:
                torch.save({"key": key, "features": features, "labels": labels}, tmp)
        except OSError as err:
            log.warning(
                "feature cache: could not write %s (%s: %s); training goes on with these features in memory, "
                "uncached (the next run computes them again)",
                path,
                type(err).__name__,
                err,
            )
            return None
        return path

    def features(
        self, backbone: nn.Module, identity: Mapping[str, Any], dataset: Dataset, batch_size: int, num_workers: int = 0
    ) -> TensorDataset:
        """The split's ``(features, label)`` pairs: read from the cache, or computed and written on a miss."""
        key = cache_key(identity, dataset)
        cached = self.load(key)
        if cached is None:
            cached = compute_features(backbone, dataset, batch_size, num_workers)
            stored = self.store(key, *cached)
            if stored is not None:
                log.info("feature cache: computed %d features -> %s", len(cached[1]), stored)
        else:
            log.info("feature cache: read %d features from %s", len(cached[1]), self.path(key))
        return TensorDataset(*cached)


# ---- the DataModule of cached features --------------------------------------------------------------------
class FeatureDataModule(pl.LightningDataModule):
    """Cached features in place of a DataModule: the same splits, batch sizes, shuffling and task attributes."""

    def __init__(self, source: pl.LightningDataModule, datasets: Dict[str, Optional[Dataset]]) -> None:
        super().__init__()
        self.source = source
        self.batch_size: int = source.batch_size
        self.eval_batch_size: int = getattr(source, "eval_batch_size", source.batch_size)
        self.num_classes: int = source.num_classes
        self.task_group = getattr(source, "task_group", None)
        self.split = getattr(source, "split", None)
        self.train_dataset = datasets.get("train")
        self.val_dataset = datasets.get("val")
        self.test_dataset = datasets.get("test")

    def _loader(self, dataset: Optional[Dataset], train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"FeatureDataModule: no dataset for this stage (split={self.split!r})")
        # the image DataModules' sampler: epoch e's order depends only on (seed, e), as without the cache
        sampler = EpochRandomSampler(dataset) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            generator=sampler.generator if sampler is not None else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, True)

    def val_dataloader(self):
        return [] if self.val_dataset is None else self._loader(self.val_dataset, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, False)


def cache_refusal(method: Any, datamodule: Any, trainer: Optional[pl.Trainer] = None) -> Optional[str]:
    """Why this run cannot train on cached features (``None``: it can)."""
    if not getattr(method, "head_only", False):
        return f"tuning={method.name} trains more than a head on a frozen, prompt-free backbone"
    if not getattr(datamodule, "deterministic_train_transform", False):
        return (
            f"{type(datamodule).__name__}'s training transform augments (random crops/flips), so the features "
            "of an image differ from epoch to epoch"
        )
    if trainer is not None and trainer.world_size > 1:
        return "training runs on several processes (the cache serves single-process runs)"
    if trainer is not None and str(trainer.precision) not in ("32", "32-true"):
        return f"trainer.precision={trainer.precision} (the cache holds float32 features)"
    return None


def cached_datamodule(
    datamodule: Any, backbone: nn.Module, identity: Mapping[str, Any], cache: FeatureCache, num_workers: int = 0
) -> FeatureDataModule:
    """Set up ``datamodule`` and replace its splits by their cached features (computed on a miss)."""
    datamodule.setup("fit")
    datasets: Dict[str, Optional[Dataset]] = {}
    batch = getattr(datamodule, "eval_batch_size", None) or datamodule.batch_size
    for split in SPLITS:
        dataset = getattr(datamodule, f"{split}_dataset", None)
        datasets[split] = None if dataset is None else cache.features(backbone, identity, dataset, batch, num_workers)
    return FeatureDataModule(datamodule, datasets)
