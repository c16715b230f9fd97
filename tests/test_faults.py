"""Fault injection: a quickstart-sized ``vpt-tune`` SIGKILLed at random moments and resumed each time ends with the
results of an uninterrupted run; a disk that fills up mid-protocol loses no earlier result, and a re-run with room
ends as the uninterrupted run. Bounded: 3 kills, seeded, a 2-point grid of 3-epoch runs on 32 images."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from vpt_lightning.runs.integrity import load_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"  # the checkout under test
TESTS = Path(__file__).resolve().parent
SEED, KILLS = 20261204, 3
TUNE = [
    "+experiment=quickstart",
    "data.num_train=32",
    "data.num_val=16",
    "data.num_test=16",
    "data.batch_size=16",
    "trainer.max_epochs=3",
    "protocol.base_lr=[0.3,1]",
    "protocol.weight_decay=[0]",
    "protocol.seeds=[1]",
    "task_name=f",
    "trainer.enable_progress_bar=false",
    "+callbacks.heartbeat._target_=resume_probe.Heartbeat",
]
PROTOCOL = Path("outputs") / "f" / "protocol" / "vpt_deep"
COMPARED = ("val/top1", "val/loss", "test/top1", "test/loss", "global_step", "epochs", "trainable_params", "config")
TIMEOUT = 300  # per process, generous for a loaded 2-core machine


def start(cwd: Path, heartbeat: Path, log: Path, fail_from: int = 0) -> subprocess.Popen:
    """``vpt-tune TUNE`` through tests/fault_hooks.py (``fail_from`` > 0: the disk fills at that atomic write)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]),
        "HYDRA_FULL_ERROR": "0",
        "HEARTBEAT_FILE": str(heartbeat),
    }
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    return subprocess.Popen(
        [sys.executable, str(TESTS / "fault_hooks.py"), str(fail_from), *TUNE],
        cwd=cwd,
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL the run and its loader workers (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def beats(heartbeat: Path) -> int:
    """Training batches run so far (a resumed run's replayed batches included)."""
    return len(heartbeat.read_text().splitlines()) if heartbeat.is_file() else 0


def progress(heartbeat: Path) -> int:
    """Distinct training batches done so far: (run folder, step) pairs, so replayed batches count once."""
    return len(set(heartbeat.read_text().splitlines())) if heartbeat.is_file() else 0


def outcome(cwd: Path) -> Dict[str, object]:
    """What the protocol decided and reported: every run's compared results, and the summary."""
    out = cwd / PROTOCOL
    runs = {
        p.parent.relative_to(out).as_posix(): {k: json.loads(p.read_text()).get(k) for k in COMPARED}
        for p in sorted(out.rglob("results.json"))
    }
    summary = out / "summary.json"
    return {"runs": runs, "summary": json.loads(summary.read_text()) if summary.is_file() else None}


def temp_files(cwd: Path) -> List[Path]:
    return [p for p in (cwd / "outputs").rglob(".*") if ".tmp" in p.name]


@dataclass
class Reference:
    outcome: Dict[str, object]
    batches: int
    seconds: float


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    cwd = tmp_path_factory.mktemp("uninterrupted")
    started = time.time()
    proc = start(cwd, cwd / "heartbeat", cwd / "log")
    assert finish(proc) == 0, (cwd / "log").read_text()[-3000:]
    result = outcome(cwd)
    assert len(result["runs"]) == 3 and result["summary"] is not None
    return Reference(result, beats(cwd / "heartbeat"), time.time() - started)


def test_sigkilled_at_random_moments_and_resumed_it_ends_as_the_uninterrupted_run(reference, tmp_path):
    rng = random.Random(SEED)
    heartbeat, log = tmp_path / "heartbeat", tmp_path / "log"
    started, kills = time.time(), []
    points = sorted(rng.sample(range(1, reference.batches - 3), KILLS))
    for k in range(KILLS):
        # kill k at a random point of the protocol's progress (distinct batches done, replays not counted; the
        # points sorted, so each resumed run gets further, and 4 batches before the end, so work is left), after
        # a random pause: the kill lands mid-batch, mid-validation, mid-checkpoint or between runs
        target, pause = points[k], rng.uniform(0.0, 0.25)
        proc = start(tmp_path, heartbeat, log)
        try:
            deadline = time.time() + TIMEOUT
            while proc.poll() is None and progress(heartbeat) < target and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(pause)
            assert proc.poll() is None, f"kill {k + 1}: the run ended before the kill\n{log.read_text()[-3000:]}"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            stop(proc)
        kills.append(
            {
                "at_batch": target,
                "pause_s": round(pause, 3),
                "batches_run": beats(heartbeat),
                "finished_runs": len(outcome(tmp_path)["runs"]),
            }
        )
    assert finish(start(tmp_path, heartbeat, log)) == 0, log.read_text()[-3000:]
    seconds = time.time() - started
    resumed = log.read_text().count("Restoring states from the checkpoint")
    print(
        f"\nfault test: {KILLS} SIGKILLs {kills}; {resumed} resume(s) from a checkpoint; killed + resumed "
        f"{seconds:.1f} s, uninterrupted {reference.seconds:.1f} s ({reference.batches} batches)"
    )
    assert outcome(tmp_path) == reference.outcome
    assert temp_files(tmp_path) == []


def test_a_disk_that_fills_up_loses_no_earlier_result(reference, tmp_path):
    """The disk fills at a random atomic write after the first run's results (#4: 3 checkpoints, then results)."""
    fail_from = random.Random(SEED + 1).randint(5, 13)  # 3 runs x (3 checkpoints + results) + summaries = 14
    log = tmp_path / "log"
    assert finish(start(tmp_path, tmp_path / "heartbeat", log, fail_from)) != 0
    assert "[Errno 28] No space left on device: '" in log.read_text()  # the file being written is named
    partial = outcome(tmp_path)
    assert partial["runs"] and partial["summary"] is None  # at least the first run finished, the protocol did not
    for run, result in partial["runs"].items():  # every result written before the disk filled is whole and right
        assert result == reference.outcome["runs"][run]
    for ckpt in (tmp_path / PROTOCOL).rglob("last.ckpt"):
        load_checkpoint(ckpt)  # readable: the previous checkpoint, never half of a new one
    assert temp_files(tmp_path) == []
    assert finish(start(tmp_path, tmp_path / "heartbeat", log)) == 0, log.read_text()[-3000:]
    assert outcome(tmp_path) == reference.outcome


def _mount_tmpfs(where: Path, size: str) -> Optional[str]:
    """Mount a tmpfs at ``where``; the reason when this machine does not allow it."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    return None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"


def test_a_real_full_disk_mid_protocol_loses_no_earlier_result(reference, tmp_path):
    """A small tmpfs filled up while the second sweep run trains: every writer (checkpoints, CSV logs) hits ENOSPC."""
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, "32m")
    if reason:
        pytest.skip(reason)
    try:
        heartbeat, log = tmp_path / "heartbeat", tmp_path / "log"
        per_run = reference.batches // 3
        proc = start(disk, heartbeat, log)
        try:
            deadline = time.time() + TIMEOUT
            while proc.poll() is None and beats(heartbeat) < per_run + 1 and time.time() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, log.read_text()[-3000:]
            with open(disk / "filler", "wb", buffering=0) as filler:  # take every byte left
                for chunk in (1 << 20, 1 << 12, 1):
                    try:
                        while True:
                            filler.write(b"\0" * chunk)
                    except OSError as err:
                        assert err.errno == errno.ENOSPC
            assert proc.wait(timeout=TIMEOUT) != 0
        finally:
            stop(proc)
        assert "No space left on device" in log.read_text()
        partial = outcome(disk)
        assert "sweep/lr0.3_wd0" in partial["runs"] and partial["summary"] is None
        for run, result in partial["runs"].items():
            assert result == reference.outcome["runs"][run]
        for ckpt in (disk / PROTOCOL).rglob("last.ckpt"):
            load_checkpoint(ckpt)  # (the re-run with room is checked by the test above)
        assert temp_files(disk) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
