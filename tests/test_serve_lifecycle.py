"""vpt-serve's lifecycle: one SIGTERM or SIGINT to its process answers the requests in flight, stops every process
the server started and exits with status 0 within 10 s (a real server in a subprocess on 127.0.0.1)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import save_task_checkpoint, write_image

from vpt_lightning.serving.launch import _healthy, free_port

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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_one_signal_answers_requests_in_flight_and_leaves_no_process(tmp_path, signum):
    torch.manual_seed(0)
    ckpt = save_task_checkpoint(tmp_path / "count.ckpt", num_classes=5, task_name="count")
    write_image(tmp_path / "x.png", seed=0, size=(30, 30))
    image = base64.b64encode((tmp_path / "x.png").read_bytes()).decode()
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
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _healthy(url):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
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
        _, alive = psutil.wait_procs(descendants, timeout=3)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"processes of the server outlived it: {alive}"
        with pytest.raises(urllib.error.URLError):  # nothing listens any more
            urllib.request.urlopen(url + "/health", timeout=2)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the test found left over
        proc.wait(timeout=30)
        log.close()
