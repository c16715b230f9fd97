"""A NaN/Inf training loss stops the run at once, names step, loss and lr, and keeps the last good checkpoint."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli_in_process

from vpt_lightning.runs.nonfinite import NonFiniteLossError, StopOnNonFiniteLoss


def _trainer(step=7, lr=0.5):
    optimizer = SimpleNamespace(param_groups=[{"lr": lr}])
    return SimpleNamespace(
        world_size=1,
        global_step=step,
        current_epoch=1,
        optimizers=[optimizer],
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=3)),
        checkpoint_callback=None,
    )


def test_the_check_names_step_loss_and_lr_and_lets_finite_losses_pass():
    callback = StopOnNonFiniteLoss()
    callback.on_before_backward(_trainer(), None, torch.tensor(2.5))
    for bad in (float("inf"), float("nan")):
        with pytest.raises(
            NonFiniteLossError, match=rf"loss {bad} at step 7 \(epoch 1, batch 3\) with learning rate 0.5"
        ):
            callback.on_before_backward(_trainer(), None, torch.tensor(bad))


def test_a_run_whose_loss_turns_nan_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    # 10 steps per epoch: epoch 0 ends with a checkpoint, the batch of step 12 (epoch 1) is NaN
    args = [
        "backbone=vit_tiny_random",
        "data.num_train=160",
        "data.num_val=32",
        "data.num_test=32",
        "data.batch_size=16",
        "trainer.max_epochs=3",
        "task_name=n",
        "run_name=nan",
        "trainer.enable_progress_bar=false",
        "+callbacks.poison._target_=resume_probe.PoisonBatch",
        "+callbacks.poison.step=12",
    ]
    proc = run_cli_in_process("train", args, tmp_path)  # resume_probe is in tests/, on this process's path
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    match = re.search(
        r"non-finite training loss nan at step 12 \(epoch 1, batch 2\) with learning rate ([0-9.e+-]+)", out
    )
    assert match and float(match.group(1)) > 0, out[-3000:]
    run = tmp_path / "outputs" / "n" / "nan"
    assert f"The last good checkpoint is kept: {run / 'checkpoints' / 'last.ckpt'}" in out
    assert not (run / "results.json").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 10
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    momentum = [s["momentum_buffer"] for s in ckpt["optimizer_states"][0]["state"].values()]
    assert momentum and all(torch.isfinite(m).all() for m in momentum)
