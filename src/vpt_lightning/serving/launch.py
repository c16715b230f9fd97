"""Running ``vpt-serve`` in a subprocess (tests, benchmarks, notebooks): start, wait until it answers, always stop;
and a load test of a running server with a share of malformed requests."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple


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
        [
            sys.executable,
            "-m",
            "vpt_lightning.cli.serve",
            *map(str, checkpoints),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *options,
        ],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                text = _read(output)
                why = (
                    f"exited with {proc.returncode}" if proc.returncode not in (None, -2) else "did not answer /health"
                )
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


# ---- load testing a running server --------------------------------------------------------------------------
def png_bytes(width: int, height: int) -> bytes:
    """A valid black greyscale PNG of ``width x height`` built without decoding any pixels: a few KB even at
    64 M pixels (zlib compresses the zero rows), the shape of a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, row = zlib.compressobj(9), b"\x00" * (width + 1)  # filter byte 0, then width grey pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_requests(task: str) -> List[Tuple[str, bytes, str, int]]:
    """Malformed requests for a server with task ``task``: ``(name, body, content type, expected status)``."""
    image = base64.b64encode(png_bytes(8, 8)).decode()
    return [
        ("not an image", b"\x89PNG broken", "image/png", 400),
        ("unknown task", json.dumps({"task": "no-such-task", "image": image}).encode(), "application/json", 400),
        ("task not a string", json.dumps({"task": [task], "image": image}).encode(), "application/json", 400),
        ("nested JSON", b"[" * 100_000 + b"]" * 100_000, "application/json", 400),
        ("malformed JSON", b'{"task": ', "application/json", 400),
        ("bad base64", json.dumps({"task": task, "image": "%%%"}).encode(), "application/json", 400),
        (
            "top_k not an int",
            json.dumps({"task": task, "image": image, "top_k": "3"}).encode(),
            "application/json",
            400,
        ),
        ("64 M pixels", png_bytes(8000, 7999), "image/png", 413),
    ]


def load_test(
    url: str,
    good: Sequence[Tuple[bytes, str]],
    bad: Sequence[Tuple[str, bytes, str, int]],
    task: str,
    requests: int = 2000,
    clients: int = 16,
    bad_every: int = 10,
    api_key: Optional[str] = None,
    timeout: float = 120,
) -> Dict[str, Any]:
    """``requests`` POSTs to ``url/predict`` from ``clients`` threads, every ``bad_every``-th a bad one (cycling
    through ``bad``), the others cycling through ``good`` (``(body, content type)``; raw images go with
    ``?task=task``). Returns requests/s, p50/p99 latency (ms) of the good requests and of all, and the failures:
    ``lost`` (no HTTP answer), ``server_errors`` (5xx), ``wrong`` (a good request not answered 200 with
    predictions, or a bad one not answered its expected 4xx)."""
    from concurrent.futures import ThreadPoolExecutor

    headers = {"X-API-Key": api_key} if api_key else {}

    def send(i: int) -> Dict[str, Any]:
        is_bad = bad_every > 0 and i % bad_every == bad_every - 1
        if is_bad:
            name, body, content_type, expected = bad[(i // bad_every) % len(bad)]
        else:
            (body, content_type), name, expected = good[i % len(good)], "good", 200
        target = url + "/predict" + ("" if content_type == "application/json" else f"?task={task}")
        req = urllib.request.Request(target, data=body, headers={"Content-Type": content_type, **headers})
        start = time.perf_counter()
        status, ok = None, False
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status = response.status
                ok = "predictions" in json.loads(response.read())
        except urllib.error.HTTPError as err:
            status = err.code
            ok = "detail" in json.loads(err.read() or b"{}")
        except Exception:  # no HTTP answer at all
            pass
        return {
            "name": name,
            "bad": is_bad,
            "status": status,
            "ok": ok and status == expected,
            "seconds": time.perf_counter() - start,
        }

    begin = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(send, range(requests)))
    elapsed = time.perf_counter() - begin

    def percentile(values: List[float], q: float) -> float:
        values = sorted(values)
        return 1000 * values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    every = [r["seconds"] for r in results]
    good_times = [r["seconds"] for r in results if not r["bad"]]
    return {
        "requests": requests,
        "clients": clients,
        "bad": sum(r["bad"] for r in results),
        "requests_per_s": requests / elapsed,
        "p50_ms": percentile(good_times, 0.5),
        "p99_ms": percentile(good_times, 0.99),
        "p50_all_ms": percentile(every, 0.5),
        "p99_all_ms": percentile(every, 0.99),
        "lost": sum(r["status"] is None for r in results),
        "server_errors": sum((r["status"] or 0) >= 500 for r in results),
        "wrong": [(r["name"], r["status"]) for r in results if not r["ok"]],
    }
