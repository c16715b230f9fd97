"""Stop a run at the first non-finite training loss, before it reaches the weights or a checkpoint."""

from __future__ import annotations

import math
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; ``vpt-tune`` counts such a sweep point as diverged."""


class StopOnNonFiniteLoss(Callback):
    """Raise :class:`NonFiniteLossError` in ``on_before_backward`` when the loss is NaN or infinite.

    The check runs before the backward pass and the optimizer step, so the weights, the optimizer state and the
    last checkpoint (written at the previous epoch end) never see the bad step. Under DDP every rank learns
    whether any rank's loss was non-finite, so all stop together instead of hanging in the next all-reduce.
    Wired in ``conf/callbacks/default.yaml``.
    """

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        value = float(loss.detach().float().flatten()[0]) if loss.numel() else math.nan
        raise NonFiniteLossError(
            f"non-finite training loss {value} at step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {trainer.fit_loop.epoch_loop.batch_idx}) with learning rate {_lr(trainer)}; stopped before the "
            f"backward pass, so no weight saw it. {_last_checkpoint(trainer)}"
            " Lower optim.base_lr or check the data."
        )


def _lr(trainer: pl.Trainer) -> str:
    rates = [group["lr"] for opt in trainer.optimizers for group in opt.param_groups]
    return ", ".join(f"{lr:.4g}" for lr in rates) if rates else "unknown"


def _last_checkpoint(trainer: pl.Trainer) -> str:
    callback: Optional[pl.callbacks.ModelCheckpoint] = trainer.checkpoint_callback
    path = callback and (callback.last_model_path or callback.best_model_path)
    if not path:
        return "No checkpoint was written yet."
    return f"The last good checkpoint is kept: {path}."
