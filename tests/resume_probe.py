"""Callbacks the subprocess runs of test_resume.py / test_nonfinite.py load
(``+callbacks.x._target_=resume_probe.X``)."""

from __future__ import annotations

import hashlib
import json
import os

import torch
from pytorch_lightning.callbacks import Callback


class RecordEpochs(Callback):
    """Append, per epoch, the first batch's sample labels and a hash of the global torch RNG to ``$PROBE_FILE``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and os.environ.get("PROBE_FILE"):
            rng = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()
            row = {"epoch": trainer.current_epoch, "labels": batch[1].tolist(), "rng": rng}
            with open(os.environ["PROBE_FILE"], "a") as f:
                f.write(json.dumps(row) + "\n")


class PoisonBatch(Callback):
    """Turn the images of the batch at global step ``step`` into NaN (a loss going non-finite mid-run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


class Heartbeat(Callback):
    """Append a line per finished training batch to ``$HEARTBEAT_FILE`` (test_faults.py kills runs by progress)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if os.environ.get("HEARTBEAT_FILE"):
            with open(os.environ["HEARTBEAT_FILE"], "a") as f:
                f.write(f"{trainer.default_root_dir} {trainer.global_step}\n")
