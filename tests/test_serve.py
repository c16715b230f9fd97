"""vpt-serve: the real server in a subprocess on localhost, real HTTP requests (mixed tasks, concurrent clients,
bad input, limits, the API key, a small load test); bounded waits, and the server is always stopped."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import save_task_checkpoint, task_probabilities, write_image

from vpt_lightning.serving.launch import bad_requests, load_test, png_bytes, running_server

pytest.importorskip("litserve")
STARTUP_SECONDS = 240  # spawning LitServe's worker re-imports torch: slow on busy shared cores
KEY = "test-key-0123"  # the server's API key, given as LitServe's environment variable
READ_TIMEOUT = 2


def parse(payload: bytes):
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode()


def request(url, body=None, content_type="application/json", timeout=60, key=KEY):
    """(status, body parsed as JSON where it is JSON) of a GET (no body) or POST, with the API key ``key``."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type} if data is not None else {}
    if key is not None:
        headers["X-API-Key"] = key
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, parse(response.read())
    except urllib.error.HTTPError as err:
        return err.code, parse(err.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    ckpts = {
        "count": save_task_checkpoint(root / "count.ckpt", num_classes=5, class_names=list("12345"), task_name="count"),
        "orient": save_task_checkpoint(
            root / "orient.ckpt",
            num_classes=3,
            prompt={"num_tokens": 3, "deep": False},
            tuning={"method": "vpt_shallow"},
            task_name="orient",
        ),
    }
    images = [root / f"{i}.png" for i in range(4)]
    for i, path in enumerate(images):
        write_image(path, seed=i, size=(36, 30))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
        "LIT_SERVER_API_KEY": KEY,
    }
    options = [
        "--max-batch-size",
        "8",
        "--batch-timeout",
        "0.05",
        "--max-request-bytes",
        "200000",
        "--accelerator",
        "cpu",
        "--read-timeout",
        str(READ_TIMEOUT),
    ]
    with running_server(list(ckpts.values()), options, startup_timeout=STARTUP_SECONDS, env=env) as url:
        yield url, ckpts, images


def test_health_and_tasks_with_their_classes(server):
    url, _, _ = server
    assert request(url + "/health") == (200, "ok")
    status, body = request(url + "/tasks")
    assert status == 200
    assert [(t["name"], t["classes"]) for t in body["tasks"]] == [("count", list("12345")), ("orient", ["0", "1", "2"])]


def test_concurrent_clients_mixing_tasks_get_each_tasks_own_answer(server):
    url, ckpts, images = server
    want = {(t, i): task_probabilities(ckpts[t], p) for t in ckpts for i, p in enumerate(images)}
    jobs = [(t, i, raw) for raw in (False, True) for t in ckpts for i in range(len(images))] * 2  # 32 requests

    def send(job):
        task, i, raw = job
        data = images[i].read_bytes()
        if raw:
            return job, request(f"{url}/predict?task={task}&top_k=2", data, "image/png")
        return job, request(url + "/predict", {"task": task, "image": base64.b64encode(data).decode(), "top_k": 2})

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(send, jobs))
    for (task, i, _raw), (status, body) in results:
        assert status == 200, body
        assert body["task"] == task
        probs = want[task, i]
        top = probs.topk(2)
        assert [p["index"] for p in body["predictions"]] == top.indices.tolist()
        assert [p["probability"] for p in body["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        names = list("12345") if task == "count" else ["0", "1", "2"]
        assert [p["class"] for p in body["predictions"]] == [names[k] for k in top.indices.tolist()]


@pytest.mark.parametrize(
    "body, content_type, status, message",
    [
        (b"\x89PNG broken", "image/png", 400, "not an image"),
        ({"task": "nope", "image": "aGk="}, None, 400, "task='nope' is not one of ['count', 'orient']"),
        ({"task": "count", "image": "%%%"}, None, 400, "not valid base64"),
        ({"task": "count"}, None, 400, "'image' must be the image file's bytes as a base64 string"),
        ({"task": "count", "image": "aGk=", "top_k": 0}, None, 400, "top_k=0 must be an integer from 1 to 1000000"),
        (["a", "list"], None, 400, "must be an object"),
        (b'{"task": "count", "image": ', "application/json", 400, "malformed JSON body"),
        (b"x" * 300_000, "image/png", 413, "over 200000"),
        (b"hello", "text/plain", 415, "send JSON (application/json) or raw image bytes"),
    ],
)
def test_bad_input_gets_a_4xx_with_a_message_and_the_server_keeps_serving(server, body, content_type, status, message):
    url, _, images = server
    target = url + "/predict" + ("?task=count" if content_type == "image/png" else "")
    got_status, got = request(target, body, content_type or "application/json")
    assert got_status == status and message in got["detail"]
    ok, answer = request(f"{url}/predict?task=orient", images[0].read_bytes(), "image/png")
    assert ok == 200 and answer["task"] == "orient"


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "body, message",
    [
        ({"task": ["count"], "image": "aGk="}, "'task' must be a string"),
        ({"task": {"name": "count"}, "image": "aGk="}, "'task' must be a string"),
        ({"task": 3, "image": "aGk="}, "'task' must be a string"),
        ({"task": "count", "image": ["aGk="]}, "'image' must be the image file's bytes as a base64 string"),
        ({"task": "count", "image": "aGk=", "top_k": "2"}, "top_k='2' must be an integer from 1 to 1000000"),
        ({"task": "count", "image": "aGk=", "top_k": True}, "top_k=True must be an integer from 1 to 1000000"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 30_000 + b"1" + b"}" * 30_000, "nested too deeply"),
        (b"\xff\xfe not utf-8", "malformed JSON body"),
    ],
)
def test_malformed_requests_get_400_not_500(server, body, message):
    url, _, _ = server
    status, got = request(url + "/predict", body)
    assert (status, message in str(got.get("detail"))) == (400, True), (status, got)


def test_images_over_the_pixel_limit_get_413_before_decoding(server):
    url, _, images = server
    bomb = png_bytes(8000, 7999)  # 62 KB, 64 M pixels: decoding it took ~1 s and ~300 MiB
    assert len(bomb) < 100_000
    start = time.monotonic()
    for body, content_type in ((bomb, "image/png"), ({"task": "count", "image": encoded(bomb)}, "application/json")):
        status, got = request(url + "/predict?task=count", body, content_type)
        assert status == 413 and "63992000 pixels" in got["detail"] and "the limit of 16777216" in got["detail"]
    assert time.monotonic() - start < 5
    status, got = request(url + "/predict?task=count", png_bytes(4096, 4096), "image/png")  # at the limit: served
    assert status == 200 and got["task"] == "count"


def image_bytes(fmt: str, frames: int = 1) -> bytes:
    from PIL import Image

    pictures = [Image.new("RGB", (20, 16), (40 * i, 90, 200)) for i in range(frames)]
    buffer = io.BytesIO()
    extra = {"save_all": True, "append_images": pictures[1:]} if frames > 1 else {}
    pictures[0].save(buffer, format=fmt, **extra)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, frames", [("JPEG", 1), ("PNG", 1), ("WEBP", 1), ("BMP", 1), ("GIF", 3), ("TIFF", 2)])
def test_allowed_formats_are_served(server, fmt, frames):
    url, _, _ = server
    status, got = request(url + "/predict?task=count", image_bytes(fmt, frames), "image/" + fmt.lower())
    assert status == 200 and len(got["predictions"]) == 5


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "ICO", "PCX"])
def test_other_formats_are_refused_unread(server, fmt):
    url, _, _ = server
    status, got = request(url + "/predict?task=count", image_bytes(fmt), "application/octet-stream")
    assert status == 400 and "not an image in a format read here (JPEG, PNG, WEBP, BMP, GIF, TIFF)" in got["detail"]


def read_whole_response(sock: socket.socket) -> bytes:
    """Headers and the body they announce: one ``recv`` may return the headers alone."""
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < announced_length(answer):
        chunk = sock.recv(4096)
        if not chunk:  # the server closed the connection
            break
        answer += chunk
    return answer


def announced_length(answer: bytes) -> int:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    lengths = [line.split(":", 1)[1] for line in head.split("\r\n") if line.startswith("content-length:")]
    return int(lengths[0]) if lengths else 0


def test_a_body_not_sent_in_time_gets_408(server):
    url, _, _ = server
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + 20) as sock:
        sock.sendall(
            b"POST /predict?task=count HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"X-API-Key: " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n" + b"\x89PNG"
        )
        start = time.monotonic()
        answer = read_whole_response(sock)  # the server must answer although 996 bytes never come
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"not received within 2 s" in answer
    assert READ_TIMEOUT - 0.5 < time.monotonic() - start < READ_TIMEOUT + 15


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /predict?task=count HTTP/1.1\r\nHost: x\r\n"],  # nothing; headers that never end (slowloris)
    ids=["nothing", "unfinished headers"],
)
def test_request_headers_not_sent_in_time_get_408_and_the_connection_closes(server, sent):
    url, _, images = server
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + 20) as sock:
        sock.sendall(sent)
        start = time.monotonic()
        answer = read_whole_response(sock)
        closed = sock.recv(1) == b""  # the server closed the connection
    assert READ_TIMEOUT - 0.5 < time.monotonic() - start < READ_TIMEOUT + 15 and closed
    if sent:  # a request begun: answered
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'{"detail": "request headers not received within 2 s"}' in answer
    else:  # nothing sent: closed without an answer
        assert answer == b""
    # a keep-alive connection is served, then closed once idle for the deadline (uvicorn's own keep-alive is 5 s)
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + 20) as sock:
        body = images[0].read_bytes()
        sock.sendall(
            b"POST /predict?task=count HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nX-API-Key: "
            + KEY.encode()
            + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert read_whole_response(sock).startswith(b"HTTP/1.1 200")
        served = time.monotonic()
        assert read_whole_response(sock) == b""  # no next request within the deadline: closed
        assert READ_TIMEOUT - 0.5 < time.monotonic() - served < 5 - 0.5


@pytest.mark.parametrize("path", ["/tasks", "/info", "/", "/predict", "/docs", "/openapi.json", "/metrics"])
def test_every_route_but_health_needs_the_api_key(server, path):
    url, _, images = server
    body = images[0].read_bytes() if path == "/predict" else None
    for key in (None, "wrong-key"):
        status, got = request(url + path + ("?task=count" if body else ""), body, "image/png", key=key)
        assert status == 401 and "X-API-Key" in got["detail"], (path, key, status, got)
    assert request(url + "/health", key=None) == (200, "ok")
    assert request(url + "/tasks")[0] == 200


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_api_docs_are_off_by_default(server, path):
    url, _, _ = server
    assert request(url + path)[0] == 404


def test_bounded_load_with_bad_requests_loses_nothing(server):
    url, _, images = server
    good = [(p.read_bytes(), "image/png") for p in images]
    good += [
        (json.dumps({"task": "count", "image": encoded(p.read_bytes())}).encode(), "application/json") for p in images
    ]
    result = load_test(
        url, good, bad_requests("count"), "count", requests=100, clients=8, bad_every=10, api_key=KEY, timeout=60
    )
    assert result["bad"] == 10
    assert (result["lost"], result["server_errors"], result["wrong"]) == (0, 0, [])
    assert result["p99_ms"] < 60_000


def test_a_refused_request_does_not_fail_the_others_of_its_batch(tmp_path):
    """LitServe answers a whole batch with the error when decoding one request raises: refusals are values."""
    from vpt_lightning.serving.multitask import MultiTaskClassifier
    from vpt_lightning.serving.server import MultiTaskAPI

    torch.manual_seed(0)
    ckpt = save_task_checkpoint(tmp_path / "count.ckpt", num_classes=5, class_names=list("12345"), task_name="count")
    write_image(tmp_path / "a.png", seed=1, size=(30, 30))
    api = MultiTaskAPI(MultiTaskClassifier.from_checkpoints([ckpt]), max_batch_size=4)
    api.setup("cpu")
    good = {"task": "count", "image": encoded((tmp_path / "a.png").read_bytes()), "top_k": 2}
    requests = [
        good,
        {"task": ["count"], "image": "aGk="},
        {"task": "count", "image": encoded(png_bytes(8000, 7999))},
        good,
    ]
    outputs = [
        api.encode_response(y) for y in api.unbatch(api.predict(api.batch([api.decode_request(r) for r in requests])))
    ]
    top = task_probabilities(ckpt, tmp_path / "a.png").topk(2)
    for i in (0, 3):
        assert [p["index"] for p in outputs[i]["predictions"]] == top.indices.tolist()
        assert [p["probability"] for p in outputs[i]["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert (outputs[1].status_code, json.loads(outputs[1].body)["detail"][:24]) == (400, "'task' must be a string,")
    assert outputs[2].status_code == 413
    single = api.encode_response(api.predict(api.decode_request(good)))  # max_batch_size=1: LitServe does not batch
    assert [p["index"] for p in single["predictions"]] == top.indices.tolist()


def test_api_key_flag_docs_flag_and_exposure_warning(tmp_path, capsys, monkeypatch):
    """In process (no server run): --api-key guards every route but /health, --docs brings the docs back, and
    the command line warns off loopback without a key and refuses two different keys."""
    from starlette.testclient import TestClient

    from vpt_lightning.cli.serve import main
    from vpt_lightning.serving.multitask import MultiTaskClassifier
    from vpt_lightning.serving.server import build_server

    monkeypatch.delenv("LIT_SERVER_API_KEY", raising=False)
    torch.manual_seed(0)
    ckpt = save_task_checkpoint(tmp_path / "count.ckpt", num_classes=5, task_name="count")
    model = MultiTaskClassifier.from_checkpoints([ckpt])
    guarded = TestClient(build_server(model, api_key="k1", accelerator="cpu").app)
    assert guarded.get("/tasks").status_code == 401
    assert guarded.get("/tasks", headers={"X-API-Key": "k2"}).status_code == 401
    assert guarded.get("/tasks", headers={"X-API-Key": "k1"}).json()["tasks"][0]["name"] == "count"
    assert guarded.get("/docs", headers={"X-API-Key": "k1"}).status_code == 404
    documented = TestClient(build_server(model, docs=True, accelerator="cpu").app)
    assert documented.get("/docs").status_code == 200 and documented.get("/openapi.json").status_code == 200
    assert documented.get("/tasks").status_code == 200  # no key set: open

    assert main([str(tmp_path / "missing.ckpt"), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "vpt-serve: warning: listening on 0.0.0.0 without an API key" in err
    assert main([str(tmp_path / "missing.ckpt"), "--host", "0.0.0.0", "--api-key", "k1"]) == 1
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv("LIT_SERVER_API_KEY", "k2")
    assert main([str(ckpt), "--api-key", "k1"]) == 1
    assert "--api-key and the environment variable LIT_SERVER_API_KEY hold different keys" in capsys.readouterr().err
