"""Nothing reused that does not fit: vpt-tune / vpt-train stop with a named error at a run of another config, an
unreadable results file, a truncated or unsafe checkpoint; one process per run folder; distinct run folder names."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_RUN, payload_checkpoint, run_cli_in_process

from vpt_lightning.config import compose
from vpt_lightning.protocol.task_protocol import point_name, run_protocol
from vpt_lightning.runs.integrity import (
    RUN_CONFIG_KEY,
    ConfigMismatchError,
    UnreadableFileError,
    UnsafeCheckpointError,
    load_checkpoint,
)
from vpt_lightning.runs.locking import FolderLockedError, folder_lock
from vpt_lightning.runs.resume import AtomicCheckpointIO

BIN = Path(sys.executable).parent
FAST = [*TINY_RUN, "trainer.enable_progress_bar=false"]
GRID = [*FAST, "protocol.base_lr=[0.5,2]", "protocol.weight_decay=[0]", "protocol.seeds=[1]"]
SWEEP = ("lr0.5_wd0", "lr2_wd0")


def tune(*overrides: str):
    return compose([*GRID, *overrides], config_name="tune")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished protocol folder (2 sweep points, seed 42, one final seed); tests mutate copies of it."""
    out = tmp_path_factory.mktemp("finished") / "protocol"
    run_protocol(tune(), out)
    return out


@pytest.fixture
def folder(finished, tmp_path) -> Path:
    copy = tmp_path / "protocol"
    shutil.copytree(finished, copy)
    return copy


def results_of(out: Path):
    return {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in sorted(out.rglob("results.json"))}


def test_every_checkpoint_carries_its_runs_config_and_loads_without_unpickling(finished):
    ckpt = load_checkpoint(finished / "sweep" / "lr2_wd0" / "checkpoints" / "last.ckpt")  # weights_only=True
    record = ckpt[RUN_CONFIG_KEY]
    assert record["result"]["seed"] == 42 and record["result"]["optim"]["base_lr"] == 2.0
    assert record["result"]["data"]["split"] == "tune"
    composed = record["composed"]
    assert composed["run_dir"] == str(finished / "sweep" / "lr2_wd0") and composed["protocol"]["base_lr"] == [0.5, 2]
    assert json.loads((finished / "sweep" / "lr2_wd0" / "results.json").read_text())["config"] == record["result"]


def test_a_rerun_with_another_seed_stops_at_the_finished_run_and_at_the_checkpoint(folder):
    """The issue's case: seed=7 over a seed-42 sweep where one point finished and one was interrupted."""
    before = results_of(folder)
    (folder / "sweep" / "lr2_wd0" / "results.json").unlink()  # interrupted after its checkpoint
    with pytest.raises(
        ConfigMismatchError,
        match=re.escape(
            f"{folder / 'sweep' / 'lr0.5_wd0' / 'results.json'} holds a finished run of another configuration "
            "(seed: 42 -> 7)"
        ),
    ):
        run_protocol(tune("seed=7"), folder)
    (folder / "sweep" / "lr0.5_wd0" / "results.json").unlink()
    ckpt = folder / "sweep" / "lr0.5_wd0" / "checkpoints" / "last.ckpt"
    with pytest.raises(
        ConfigMismatchError,
        match=re.escape(
            f"the checkpoint {str(ckpt)!r} was written by a run of another configuration (seed: 42 -> 7); "
            "it is not resumed"
        ),
    ):
        run_protocol(tune("seed=7"), folder)
    assert [k for k in results_of(folder) if k.startswith("sweep/")] == []  # nothing written, nothing resumed
    # --force: those runs start afresh, under the new seed
    summary = run_protocol(tune("seed=7", "protocol.restart=true"), folder)
    after = results_of(folder)
    assert all(after[f"sweep/{p}/results.json"]["config"]["seed"] == 7 for p in SWEEP)
    final = f"final/{point_name(summary['selected'])}/seed1/results.json"
    assert after[final]["config"]["seed"] == 1 and summary["test_top1_per_seed"]["1"] == after[final]["test/top1"]
    assert before["sweep/lr0.5_wd0/results.json"]["config"]["seed"] == 42


def test_a_truncated_checkpoint_stops_vpt_tune_naming_it_and_force_restarts_that_point(folder):
    point = folder / "sweep" / "lr2_wd0"
    (point / "results.json").unlink()
    ckpt = point / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    kept = (folder / "sweep" / "lr0.5_wd0" / "results.json").stat().st_mtime_ns
    with pytest.raises(
        UnreadableFileError,
        match=re.escape(f"the checkpoint {str(ckpt)!r} ({len(data) // 2} bytes) is not readable")
        + ".*truncated or damaged",
    ):
        run_protocol(tune(), folder)
    summary = run_protocol(tune("protocol.restart=true"), folder)
    assert summary["failed"] == [] and json.loads((point / "results.json").read_text())["epochs"] == 1
    assert load_checkpoint(ckpt)["epoch"] == 0  # written afresh
    assert (folder / "sweep" / "lr0.5_wd0" / "results.json").stat().st_mtime_ns == kept  # the other point untouched


@pytest.mark.parametrize("content", ["", '{"val/top1": 0.5', "[1, 2]"])
def test_an_unreadable_results_file_stops_vpt_tune_naming_it(folder, content):
    bad = folder / "sweep" / "lr2_wd0" / "results.json"
    bad.write_text(content)
    with pytest.raises(UnreadableFileError, match=re.escape(f"{str(bad)!r} is not a readable results file")):
        run_protocol(tune(), folder)
    assert bad.read_text() == content


def test_temp_files_of_a_killed_run_are_removed_when_the_protocol_takes_its_folders(folder):
    stale = [
        folder / ".summary.k1lled_1.tmp.json",
        folder / "sweep" / "lr2_wd0" / ".results.a8Bc_d9x.tmp.json",
        folder / "sweep" / "lr2_wd0" / "checkpoints" / ".last.q7w_e2rT.tmp.ckpt",
    ]
    for path in stale:
        path.write_bytes(b"half a file")
    run_protocol(tune(), folder)  # every run finished: nothing trains, the folders are only checked
    assert not any(p.exists() for p in stale) and (folder / "summary.json").is_file()


def test_a_crafted_checkpoint_is_refused_on_resume_and_its_payload_never_runs(folder, tmp_path, monkeypatch):
    # the worst case: an environment that tells torch.load to unpickle anything unless told otherwise
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "payload-ran"
    point = folder / "sweep" / "lr2_wd0"
    ckpt = point / "checkpoints" / "last.ckpt"
    payload_checkpoint(ckpt, ckpt, marker)
    with pytest.raises(
        UnsafeCheckpointError,
        match=re.escape(f"refused to load the checkpoint {str(ckpt)!r}")
        + r".*Unsupported global: GLOBAL (builtins\.)?exec",
    ):
        AtomicCheckpointIO().load_checkpoint(ckpt)  # what Lightning calls on ckpt_path=...
    (point / "results.json").unlink()
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(ckpt))):
        run_protocol(tune(), folder)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["payload", "truncated"])
def test_vpt_train_refuses_a_crafted_or_truncated_checkpoint_with_a_named_error(
    finished, tmp_path, damage, monkeypatch
):
    marker = tmp_path / "payload-ran"
    real = finished / "sweep" / "lr2_wd0" / "checkpoints" / "last.ckpt"
    bad = tmp_path / "given.ckpt"
    if damage == "payload":
        payload_checkpoint(real, bad, marker)
    else:
        bad.write_bytes(real.read_bytes()[: real.stat().st_size // 2])  # today: OSError [Errno 22], no file named
    # vpt-train's main in this process (test_cli.py runs its console script), with the variable that turns torch.load's
    # default to full unpickling set: the command's own check refuses the file all the same
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    proc = run_cli_in_process("train", [*FAST, "task_name=t", "run_name=r", f"ckpt_path={bad}"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    expected = "refused to load the checkpoint" if damage == "payload" else "is not readable ("
    assert "vpt-train: error: " in proc.stderr and expected in proc.stderr and str(bad) in proc.stderr
    assert damage == "payload" or "truncated or damaged" in proc.stderr
    assert not marker.exists() and not (tmp_path / "outputs" / "t" / "r" / "results.json").exists()


HOLD = """
import contextlib, sys, time
from vpt_lightning.runs.locking import folder_lock
with contextlib.ExitStack() as stack:
    for folder in sys.argv[1:]:
        stack.enter_context(folder_lock(folder))
    print("held", flush=True)
    time.sleep(300)
"""


def test_a_second_process_on_a_locked_folder_fails_at_once_naming_the_holder(tmp_path):
    protocol_dir = tmp_path / "outputs" / "demo" / "protocol" / "vpt_deep"
    run_dir = tmp_path / "outputs" / "t" / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(protocol_dir), str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.time()
        # the commands' main in this process: the lock is held by another one
        proc = run_cli_in_process("tune", [*GRID, "task_name=demo"], tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert (
            f"the protocol folder {str(protocol_dir)!r} is in use by another process (PID {holder.pid} on"
            in proc.stderr
        )
        assert not (protocol_dir / "sweep").exists()  # it trained nothing
        proc = run_cli_in_process("train", [*FAST, "task_name=t", "run_name=r"], tmp_path)
        assert (
            proc.returncode != 0
            and f"the run folder {str(run_dir)!r} is in use by another process (PID {holder.pid}" in proc.stderr
        ), proc.stderr[-3000:]
        assert not (run_dir / "checkpoints").exists() and time.time() - started < 120
        with pytest.raises(FolderLockedError, match=f"PID {holder.pid}"):
            with folder_lock(run_dir):
                pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # no clean-up code runs: the OS releases the locks
        holder.wait(timeout=30)
    with folder_lock(protocol_dir), folder_lock(run_dir), folder_lock(run_dir):  # free, and re-entrant
        assert f"PID {os.getpid()} on" in (run_dir / ".lock").read_text()
    with folder_lock(run_dir):  # released when the block ended
        pass


def test_default_run_folder_names_differ_within_one_second():
    while True:  # two names composed within the same wall-clock second
        second = int(time.time())
        names = [compose([])["run_name"] for _ in range(2)]
        if int(time.time()) == second:
            break
    assert names[0] != names[1] and re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}", names[0])


def test_a_lock_ends_with_its_process_not_with_a_forked_child_such_as_a_loader_worker(tmp_path):
    import fcntl

    ready, started = os.pipe()
    with folder_lock(tmp_path):
        child = os.fork()
        if child == 0:  # a DataLoader worker would be forked like this, inheriting the lock file's descriptor
            os.write(started, b"1")  # the fork has returned here: the at-fork hooks have run
            time.sleep(10)
            os._exit(0)
    assert os.read(ready, 1) == b"1"
    try:
        fd = os.open(tmp_path / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if the child still held it
        finally:
            os.close(fd)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
