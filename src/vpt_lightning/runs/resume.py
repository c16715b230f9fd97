"""Exact resume: every epoch's randomness is a pure function of ``(seed, epoch)``, and checkpoints are atomic.

A run killed at any moment and resumed with ``ckpt_path=last`` (the last epoch-end checkpoint) must end with
exactly the metrics of the uninterrupted run. Nothing random is carried across an epoch boundary, so nothing
random has to be saved:

- :class:`EpochRandomSampler` (the training loader's sampler) draws epoch ``e``'s order from ``(seed, e)``
  (Lightning calls ``set_epoch`` before every epoch, as for its ``DistributedSampler``, which replaces this one
  under DDP with the same ``seed + epoch`` rule). Its generator is also the loader's ``generator``, so the
  workers' base seed comes from it, never from the global torch RNG, and a loader whose persistent workers are
  re-created on resume draws nothing more from the global RNG than one that reuses them.
- :class:`EpochSeed` (a callback) re-seeds the global torch (and CUDA), numpy and python RNGs from
  ``(seed, epoch, rank)`` at every training epoch start: prompt dropout and anything else drawing from them
  (data code in the main process, validation loaders' worker seeds) no longer depends on what the previous
  epochs, a sanity check or a restore consumed.
- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the same folder, syncs it, then
  renames it over the old one, so a kill during the write leaves the previous ``last.ckpt`` intact; it reads
  checkpoints with ``torch.load(weights_only=True)`` only.

Known limit: persistent loader workers (``num_workers > 0``) keep their own RNG streams from the epoch they
were started in; data code that draws random numbers *in the workers* (e.g. random crops) is therefore exact on
resume only with ``data.persistent_workers=false``. The data order, the dropout and the synthetic data are exact
either way.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sized

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch.utils.data import RandomSampler

from .atomic import atomic_path
from .integrity import load_checkpoint


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A well-mixed 32-bit seed for ``(seed, epoch, rank)`` (neighbouring epochs get unrelated streams)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(rank)]).generate_state(1)[0])


def seed_rngs(seed: int) -> None:
    """Seed the global torch (CPU and every CUDA device), numpy and python RNGs, without logging."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def global_seed() -> Optional[int]:
    """The seed given to ``pytorch_lightning.seed_everything`` (``PL_GLOBAL_SEED``), if any."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value not in (None, "") else None


class EpochRandomSampler(RandomSampler):
    """A shuffling sampler whose order in epoch ``e`` depends only on ``(seed, e)``.

    ``seed`` defaults to ``PL_GLOBAL_SEED`` (what ``seed_everything`` set, as Lightning's ``DistributedSampler``
    uses), else a draw from the global torch RNG. ``generator`` is re-seeded at every ``set_epoch``; pass it to
    the ``DataLoader`` so that its workers' base seed is drawn from it rather than from the global RNG.
    """

    def __init__(self, data_source: Sized, seed: Optional[int] = None) -> None:
        super().__init__(data_source, generator=torch.Generator())
        if seed is None:
            seed = global_seed()
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.seed = int(seed)
        self.iter_epoch: Optional[int] = None  # the epoch of an iteration under way
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch, 1))

    def __iter__(self) -> Iterator[int]:
        # runs at the first index drawn: when the loader's workers prefetch, that is when the iterator is made
        self.iter_epoch = self.epoch
        # a generator of its own, so that the order does not depend on how many base seeds the loader drew
        order = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, 2))
        yield from torch.randperm(len(self.data_source), generator=order).tolist()
        self.iter_epoch = None


class EpochSeed(Callback):
    """Re-seed the global RNGs from ``(seed, epoch, global rank)`` at every training epoch start.

    Wired in ``conf/callbacks/default.yaml`` with the run's ``seed``. Lightning calls ``on_train_epoch_start``
    before it creates the epoch's training-loader iterator, in an uninterrupted run and after a resume alike.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed_rngs(epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank))
        restart_stale_iterators(trainer)


def restart_stale_iterators(trainer: pl.Trainer) -> None:
    """Re-create the training iterator when it already drew indices for another epoch than this one.

    Lightning makes the first training iterator of a ``fit`` while loading the data (here while the schedule is
    built, before the checkpoint's loop state is restored), i.e. before it calls ``set_epoch``, and on resume it
    does not re-create it at the epoch start. Loader workers prefetch indices as soon as the iterator exists, so
    the first epoch after a resume would replay epoch 0's order; re-creating it (as Lightning does at every later
    epoch) draws the right one. Without workers the order is drawn lazily and nothing is redone.
    """
    loaders = getattr(trainer.fit_loop._combined_loader, "flattened", None) or []
    stale = [
        dl
        for dl in loaders
        if isinstance(getattr(dl, "sampler", None), EpochRandomSampler)
        and dl.sampler.iter_epoch not in (None, dl.sampler.epoch)
    ]
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if stale and fetcher is not None:
        iter(fetcher)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a half-written checkpoint at the target path and never unpickles
    anything but tensors and plain values.

    Lightning's own write goes through an fsspec transaction whose temporary file lives in the system temp
    folder; when that is another file system than the run folder, the final move is a copy into the target,
    which a kill interrupts half-way. Here the temporary file is in the target's folder, is fsynced, then
    ``os.replace``-d over the target (atomic on POSIX and Windows; :func:`vpt_lightning.runs.atomic.atomic_path`).
    Reads (``ckpt_path=...`` resumes) use ``torch.load(weights_only=True)`` whatever Lightning asks for, so a
    checkpoint with a pickle payload is refused before any of it runs, and a truncated one gets an error naming
    the file (:func:`vpt_lightning.runs.integrity.load_checkpoint`). Remote paths use Lightning's own I/O.
    Wired as a trainer plugin in ``conf/trainer/default.yaml`` (FSDP's full state dict goes through it too;
    its sharded checkpoints are folders written by FSDP itself).
    """

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(
        self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
    ) -> Dict[str, Any]:
        if map_location is None:
            map_location = lambda storage, loc: storage  # noqa: E731 - Lightning's default
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint(Path(path), map_location=map_location)
