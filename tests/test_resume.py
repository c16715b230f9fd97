"""Exact resume: a run SIGKILLed mid-epoch and resumed with ckpt_path=last ends exactly as the uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from vpt_lightning import resume
from vpt_lightning.config import compose
from vpt_lightning.runs.resume import AtomicCheckpointIO, EpochRandomSampler, EpochSeed

SRC = Path(__file__).resolve().parents[1] / "src"  # the checkout under test (also in CI's editable install)
TESTS = Path(__file__).resolve().parent
# dropout > 0 so that the global RNG matters; a few hundred images, 4 short epochs
EPOCHS = 4
RUN = [
    "backbone=vit_tiny_random",
    "data.num_train=192",
    "data.num_val=32",
    "data.num_test=32",
    "data.batch_size=32",
    f"trainer.max_epochs={EPOCHS}",
    "prompt.dropout=0.2",
    "optim.base_lr=3",
    "optim.warmup_epochs=1",
    "task_name=r",
    "trainer.enable_progress_bar=false",
    "+callbacks.probe._target_=resume_probe.RecordEpochs",
]
COMPARED = ("val/top1", "test/top1", "train/loss_epoch", "val/loss", "test/loss", "global_step", "epochs")


def start(args, cwd: Path, probe: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]),
        "HYDRA_FULL_ERROR": "0",
        "PROBE_FILE": str(probe),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "vpt_lightning.cli.train", *RUN, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the run and its loader workers (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def saved_epoch(ckpt: Path):
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"]
    except Exception:  # not there yet
        return None


def probe_rows(path: Path):
    return {row["epoch"]: row for row in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("full")
    finish(start(["run_name=full"], cwd, cwd / "probe.jsonl"))
    run = cwd / "outputs" / "r" / "full"
    return json.loads((run / "results.json").read_text()), run / "checkpoints" / "last.ckpt", cwd / "probe.jsonl"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_results(tmp_path, uninterrupted, workers):
    full, full_ckpt, full_probe = uninterrupted
    args = ["run_name=cut", f"data.num_workers={workers}"]  # num_workers does not change what a run computes
    ckpt = tmp_path / "outputs" / "r" / "cut" / "checkpoints" / "last.ckpt"
    proc = start(args, tmp_path, tmp_path / "probe.jsonl")
    try:
        deadline, epoch = time.time() + 90, None
        while time.time() < deadline and proc.poll() is None:
            epoch = saved_epoch(ckpt) if ckpt.is_file() else None
            if epoch is not None and epoch >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        assert epoch is not None and epoch >= 1, "no checkpoint of epoch >= 1 within 90 s"
        os.killpg(proc.pid, signal.SIGKILL)  # mid-way through the next epoch
        proc.wait(timeout=30)
    finally:
        kill(proc)
    assert not (ckpt.parent.parent / "results.json").exists() and saved_epoch(ckpt) < EPOCHS - 1
    out = finish(start([*args, "ckpt_path=last"], tmp_path, tmp_path / "probe.jsonl"))
    assert "Restoring states from the checkpoint" in out

    resumed = json.loads((ckpt.parent.parent / "results.json").read_text())
    assert {k: resumed[k] for k in COMPARED} == {k: full[k] for k in COMPARED}
    state, full_state = (torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for p in (ckpt, full_ckpt))
    assert state.keys() == full_state.keys() and all(torch.equal(state[k], full_state[k]) for k in state)
    # what made it exact: each epoch's data order and global RNG state, including the epochs after the resume
    rows, full_rows = probe_rows(tmp_path / "probe.jsonl"), probe_rows(full_probe)
    assert rows == full_rows and len(rows) == EPOCHS


def test_the_data_order_of_an_epoch_depends_only_on_seed_and_epoch():
    data = list(range(50))
    walked = EpochRandomSampler(data, seed=7)
    orders = []
    for epoch in range(4):
        walked.set_epoch(epoch)
        orders.append(list(walked))
    fresh = EpochRandomSampler(data, seed=7)  # a resumed run's sampler, never iterated before
    fresh.set_epoch(3)
    torch.rand(5)  # the global RNG does not matter
    assert list(fresh) == orders[3] and sorted(orders[3]) == data
    assert len({tuple(o) for o in orders}) == 4 and list(EpochRandomSampler(data, seed=8)) != orders[0]
    # the loader's workers draw their base seed from the sampler's generator, re-seeded per epoch too
    assert walked.generator.initial_seed() == fresh.generator.initial_seed()
    loader = torch.utils.data.DataLoader(data, sampler=fresh, generator=fresh.generator)
    assert loader.generator is fresh.generator


def test_epoch_seed_makes_the_global_rngs_a_function_of_seed_and_epoch():
    callback = EpochSeed(seed=3)
    loaders = SimpleNamespace(_combined_loader=None, _data_fetcher=None)
    draws = []
    for consumed in (0, 17):
        torch.rand(consumed), np.random.rand(consumed), [random.random() for _ in range(consumed)]
        trainer = SimpleNamespace(current_epoch=2, global_rank=0, fit_loop=loaders)
        callback.on_train_epoch_start(trainer, None)
        draws.append((torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()))
    assert draws[0] == draws[1]
    callback.on_train_epoch_start(SimpleNamespace(current_epoch=3, global_rank=0, fit_loop=loaders), None)
    assert torch.rand(3).tolist() != draws[0][0]


def test_a_failed_checkpoint_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    io, target = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, target)

    def killed_half_way(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(resume.torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["epoch"] == 1 and os.listdir(target.parent) == ["last.ckpt"]
    io.save_checkpoint({"epoch": 3}, target)
    assert io.load_checkpoint(target)["epoch"] == 3 and os.listdir(target.parent) == ["last.ckpt"]


@pytest.mark.parametrize("trainer", ["cpu", "ddp"])
def test_vpt_train_writes_checkpoints_through_the_atomic_io(trainer):
    cfg = compose([f"trainer={trainer}", "trainer.accelerator=cpu", "run_dir=/tmp/unused"])
    built = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO)
    callbacks = {type(c).__name__ for c in map(instantiate, cfg.callbacks.values())}
    assert {"EpochSeed", "StopOnNonFiniteLoss", "ModelCheckpoint"} <= callbacks
