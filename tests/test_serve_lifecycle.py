"""vpt-serve's lifecycle: one SIGTERM or SIGINT to its process answers the requests in flight, stops every process
the server started and exits with status 0 within 10 s; after a SIGKILL no process of the server is left (a real
server in a subprocess on 127.0.0.1)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import save_task_checkpoint, write_image

from vpt_lightning.serving.launch import _healthy, free_port
from vpt_lightning.serving.server import STATUS_PREFIX, remove_stale_status_folders

pytest.importorskip("litserve")
psutil = pytest.importorskip("psutil")
STARTUP_SECONDS = 240
IN_FLIGHT = 6


def post(url: str, body: dict, results: list, index: int) -> None:
    req = urllib.request.Request(
        url + "/predict", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            results[index] = (response.status, json.loads(response.read()))
    except urllib.error.HTTPError as err:
        results[index] = (err.code, err.read().decode(errors="replace"))
    except Exception as err:  # a reset or refused connection: the request was lost
        results[index] = (None, repr(err))


def start_server(tmp_path: Path) -> tuple:
    """``vpt-serve`` on a task checkpoint in its own session; returns ``(proc, url, log file)`` once it answers."""
    ckpt = save_task_checkpoint(tmp_path / "count.ckpt", num_classes=5, task_name="count")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    # a batch waits 2 s to fill: requests sent just before the signal are still in the worker when it arrives
    command = [
        sys.executable,
        "-m",
        "vpt_lightning.cli.serve",
        str(ckpt),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--accelerator",
        "cpu",
        "--max-batch-size",
        "64",
        "--batch-timeout",
        "2",
    ]
    log = open(tmp_path / "server.log", "wb+")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc, log)
            raise AssertionError((tmp_path / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    return proc, url, log


def stop_server(proc: subprocess.Popen, log) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the test found left over
    proc.wait(timeout=30)
    log.close()


def still_running(processes: list) -> list:
    _, alive = psutil.wait_procs(processes, timeout=3)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def assert_nothing_left(processes: list, url: str, within: float = 0) -> None:
    """None of the server's ``processes`` runs (after waiting up to ``within`` s) and nothing answers on ``url``."""
    deadline = time.monotonic() + within
    while still_running(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = still_running(processes)
    assert not alive, f"processes of the server outlived it: {[p.cmdline()[-3:] for p in alive]}"
    with pytest.raises(urllib.error.URLError):  # nothing listens any more
        urllib.request.urlopen(url + "/health", timeout=2)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_one_signal_answers_requests_in_flight_and_leaves_no_process(tmp_path, signum):
    torch.manual_seed(0)
    write_image(tmp_path / "x.png", seed=0, size=(30, 30))
    image = base64.b64encode((tmp_path / "x.png").read_bytes()).decode()
    proc, url, log = start_server(tmp_path)
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 2, descendants  # at least LitServe's inference worker and uvicorn process

        results: list = [None] * IN_FLIGHT
        threads = [
            threading.Thread(target=post, args=(url, {"task": "count", "image": image}, results, i))
            for i in range(IN_FLIGHT)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.7)
        assert all(r is None for r in results), "requests were answered before the signal: not in flight"
        signalled = time.monotonic()
        os.kill(proc.pid, signum)
        returncode = proc.wait(timeout=30)
        elapsed = time.monotonic() - signalled
        for thread in threads:
            thread.join(timeout=30)

        output = (tmp_path / "server.log").read_text()
        assert returncode == 0, output[-3000:]
        assert elapsed < 10, f"exited {elapsed:.1f} s after the signal"
        for status, body in results:
            assert status == 200 and body["task"] == "count", (status, body)
        assert_nothing_left(descendants, url)
    finally:
        stop_server(proc, log)


def test_a_sigkilled_server_leaves_no_process_listening_or_waiting(tmp_path):
    # SIGKILL cannot be handled: the processes the server forked (uvicorn, LitServe's manager) end because Linux
    # sends them SIGTERM when it dies (prctl PR_SET_PDEATHSIG); they used to go on answering /health
    proc, url, log = start_server(tmp_path)
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 3, descendants  # manager, inference worker, uvicorn (and the resource tracker)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert_nothing_left(descendants, url, within=10)
    finally:
        stop_server(proc, log)
    # its status folder is left behind (nothing runs after a SIGKILL); the next server's start removes it
    (left,) = Path(tempfile.gettempdir()).glob(f"{STATUS_PREFIX}{proc.pid}-*")
    assert str(left) in remove_stale_status_folders() and not left.exists()


def test_only_the_status_folders_of_ended_servers_are_removed(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, alive_pid = int(ended.stdout), os.getpid()
    for name in (f"{STATUS_PREFIX}{dead_pid}-a", f"{STATUS_PREFIX}{alive_pid}-b", f"{STATUS_PREFIX}abc-c", "other-1-d"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text("{}")
    (tmp_path / f"{STATUS_PREFIX}{dead_pid}-link").symlink_to(tmp_path / "other-1-d")
    (tmp_path / f"{STATUS_PREFIX}{dead_pid}").mkdir()  # an older version's name (no pid): left
    assert remove_stale_status_folders(str(tmp_path)) == [str(tmp_path / f"{STATUS_PREFIX}{dead_pid}-a")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            f"{STATUS_PREFIX}{alive_pid}-b",
            f"{STATUS_PREFIX}abc-c",
            "other-1-d",
            f"{STATUS_PREFIX}{dead_pid}-link",
            f"{STATUS_PREFIX}{dead_pid}",
        ]
    )
    assert (tmp_path / "other-1-d" / "state.json").is_file()  # a link's target is never followed


CHILD_NAMES = {
    "uvicorn": "the uvicorn process",
    "inference worker": "the inference worker",
    "manager": "LitServe's manager process",
}


def server_child(proc: subprocess.Popen, which: str):
    """The server's uvicorn process or LitServe's manager (both forked, so with the server's command line; the
    manager first), or its inference worker (spawned by multiprocessing)."""
    children = psutil.Process(proc.pid).children()
    if which == "inference worker":
        return next(c for c in children if "spawn_main" in " ".join(c.cmdline()))
    forked = sorted(
        (c for c in children if c.cmdline() == psutil.Process(proc.pid).cmdline()), key=lambda c: c.create_time()
    )
    assert len(forked) == 2, [c.cmdline() for c in children]
    return forked[0] if which == "manager" else forked[1]


@pytest.mark.parametrize("which", list(CHILD_NAMES))
def test_a_dead_child_stops_the_server_with_an_error_and_leaves_no_process(tmp_path, which):
    # an OOM kill of uvicorn left the main process, LitServe's manager and the worker waiting: the port accepted
    # connections (the main process holds the socket) and nothing answered. A supervisor restarts a server that exits.
    proc, url, log = start_server(tmp_path)
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
        victim = server_child(proc, which)
        victim.kill()
        killed = time.monotonic()
        try:
            returncode = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server still runs 30 s after its {which} died")
        elapsed = time.monotonic() - killed
        output = (tmp_path / "server.log").read_text()
        assert returncode == 1 and elapsed < 15, (returncode, elapsed, output[-3000:])
        errors = [line for line in output.splitlines() if line.startswith("vpt-serve: error:")]
        assert errors == [
            f"vpt-serve: error: {CHILD_NAMES[which]} (pid {victim.pid}) was killed by SIGKILL: the server stopped"
        ], output[-3000:]
        # the main process prints no traceback; with the manager gone, LitServe's loop in the inference worker
        # raises on its broken queue (and prints that) before the worker is stopped
        worker_tracebacks = output.count("Process inference-worker:\nTraceback") if which == "manager" else 0
        assert output.count("Traceback") == worker_tracebacks <= 1, output[-3000:]
        assert_nothing_left(descendants, url, within=10)
    finally:
        stop_server(proc, log)
