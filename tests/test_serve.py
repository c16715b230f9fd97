"""vpt-serve: the real server in a subprocess on localhost, real HTTP requests (mixed tasks, concurrent clients,
bad input); bounded waits, and the server is always stopped."""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import save_task_checkpoint, task_probabilities, write_image
from vpt_lightning.serving.launch import running_server

pytest.importorskip("litserve")
STARTUP_SECONDS = 240  # spawning LitServe's worker re-imports torch: slow on busy shared cores


def parse(payload: bytes):
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode()


def request(url, body=None, content_type="application/json", timeout=60):
    """(status, body parsed as JSON where it is JSON) of a GET (no body) or POST."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data is not None else {})
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
        "orient": save_task_checkpoint(root / "orient.ckpt", num_classes=3, prompt={"num_tokens": 3, "deep": False},
                                       tuning={"method": "vpt_shallow"}, task_name="orient"),
    }
    images = [root / f"{i}.png" for i in range(4)]
    for i, path in enumerate(images):
        write_image(path, seed=i, size=(36, 30))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    options = ["--max-batch-size", "8", "--batch-timeout", "0.05", "--max-request-bytes", "200000", "--accelerator", "cpu"]
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
    for (task, i, raw), (status, body) in results:
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
        ({"task": "count", "image": "aGk=", "top_k": 0}, None, 400, "top_k=0 must be a positive integer"),
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
