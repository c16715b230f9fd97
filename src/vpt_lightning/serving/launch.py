"""Running ``vpt-serve`` in a subprocess (tests, benchmarks, notebooks): start, wait until it answers, always stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator, Optional, Sequence


def free_port() -> int:
    """A TCP port free on localhost now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(
    checkpoints: Sequence[os.PathLike],
    options: Sequence[str] = (),
    port: Optional[int] = None,
    startup_timeout: float = 240,
    env: Optional[dict] = None,
    log: Optional[os.PathLike] = None,
) -> Iterator[str]:
    """Start ``vpt-serve CKPT... --host 127.0.0.1 --port N OPTIONS`` and yield its URL once ``/health`` answers.

    The server runs in its own process group (with the inference workers LitServe spawns); on exit the group is
    interrupted, and killed if it lingers. A server that exits or stays silent past ``startup_timeout`` seconds
    raises ``RuntimeError`` with the end of its output (written to ``log`` if given, else to a temporary file).
    """
    port = port or free_port()
    output = open(log, "wb+") if log else tempfile.TemporaryFile()  # a file: a full pipe would block the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "vpt_lightning.cli.serve", *map(str, checkpoints), "--host", "127.0.0.1",
         "--port", str(port), *options],
        env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                text = _read(output)
                why = f"exited with {proc.returncode}" if proc.returncode not in (None, -2) else "did not answer /health"
                raise RuntimeError(f"vpt-serve {why} within {startup_timeout} s:\n{text[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
        output.close()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def _read(output) -> str:
    output.seek(0)
    return output.read().decode(errors="replace")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Interrupt the server's process group; kill what is left of it after ``timeout`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers of the group that outlived the server
    proc.wait(timeout=timeout)
