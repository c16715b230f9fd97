"""vpt-serve --tasks DIR: the real server in a subprocess on localhost serving a folder of task packages loaded on
demand: paged /tasks with each task's state, answers equal to each task alone with their version, the admin routes
behind the API key, a task added to the folder served within 2 s; bounded waits, the server always stopped."""

from __future__ import annotations

import base64
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import write_image
from test_task_store import package_files, write_package

from vpt_lightning.serving.launch import running_server
from vpt_lightning.serving.package_io import install_package, stage_package

pytest.importorskip("litserve")
httpx = pytest.importorskip("httpx")
STARTUP_SECONDS = 240
KEY = "store-key-0123"
TASKS = {
    "deep": dict(num_classes=4, prompt={"num_tokens": 5}),
    "shallow": dict(num_classes=3, prompt={"num_tokens": 2, "deep": False}, tuning={"method": "vpt_shallow"}),
    "linear": dict(num_classes=5, prompt={"num_tokens": 0}, tuning={"method": "linear"}),
}


def probabilities(folder: Path, image: Path) -> torch.Tensor:
    """The task's own TaskModel on an image prepared as evaluation prepares it without a recorded transform."""
    from PIL import Image
    from torchvision import transforms as T

    from vpt_lightning.sharing.task_sources import load_task

    prepare = T.Compose(
        [
            T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    with torch.no_grad():
        return load_task(folder)(prepare(Image.open(image).convert("RGB"))[None]).softmax(-1)[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_store")
    folder = root / "tasks"
    for i, (name, kw) in enumerate(TASKS.items()):
        write_package(folder / name, i, **kw)
    spare = root / "spare"
    write_package(spare / "fresh", 10, num_classes=6, prompt={"num_tokens": 3})
    write_package(spare / "fresh_v2", 11, num_classes=6, prompt={"num_tokens": 3})
    write_package(spare / "dropped", 12, num_classes=2, prompt={"num_tokens": 1})
    image = root / "a.png"
    write_image(image, seed=3, size=(36, 30))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
        "LIT_SERVER_API_KEY": KEY,
    }
    options = ["--tasks", str(folder), "--pin", "deep", "--cache-bytes", "1MiB", "--accelerator", "cpu"]
    options += ["--max-batch-size", "4", "--batch-timeout", "0.02"]
    with running_server([], options, startup_timeout=STARTUP_SECONDS, env=env) as url:
        with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as client:
            yield client, folder, spare, image


def predict(client, task: str, image: Path):
    return client.post("/predict", json={"task": task, "image": base64.b64encode(image.read_bytes()).decode()})


def upload(folder: Path) -> dict:
    return {name: (name, data) for name, data in package_files(folder).items()}


def eventually(check, seconds: float):
    start = time.monotonic()
    while True:
        result = check()
        if result or time.monotonic() - start > seconds:
            return result, time.monotonic() - start
        time.sleep(0.05)


def test_tasks_are_paged_with_their_state_and_answers_equal_each_task_alone(server):
    client, folder, _, image = server
    first = client.get("/tasks", params={"limit": 2}).json()
    rest = client.get("/tasks", params={"offset": 2, "limit": 100}).json()
    assert (first["total"], first["offset"], first["limit"]) == (3, 0, 2)
    assert [t["name"] for t in first["tasks"] + rest["tasks"]] == ["deep", "linear", "shallow"]
    states = {t["name"]: t["state"] for t in first["tasks"] + rest["tasks"]}
    assert states == {"deep": "pinned", "linear": "indexed", "shallow": "indexed"}
    assert first["cache"]["budget"] == 2**20 and 0 < first["cache"]["bytes"] <= 2**20
    assert client.get("/tasks", params={"limit": 0}).status_code == 400
    for name in ("shallow", "linear"):
        response = predict(client, name, image)
        assert response.status_code == 200, response.text
        body = response.json()
        want = probabilities(folder / name, image)
        got = torch.zeros_like(want)
        for p in body["predictions"]:
            got[p["index"]] = p["probability"]
        top = want.topk(len(body["predictions"]))
        assert [p["index"] for p in body["predictions"]] == top.indices.tolist()
        assert [p["probability"] for p in body["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert len(body["version"]) == 16
    resident, _ = eventually(lambda: client.get("/tasks/shallow").json()["state"] == "resident", 3)
    assert resident
    assert client.get("/tasks/nope").status_code == 404


@pytest.mark.parametrize("method, path", [("PUT", "/tasks/x"), ("DELETE", "/tasks/deep"), ("GET", "/tasks")])
def test_the_task_routes_need_the_api_key(server, method, path):
    client = server[0]
    for headers in ({"X-API-Key": ""}, {"X-API-Key": "wrong"}):
        assert client.request(method, path, headers=headers).status_code == 401


def test_put_adds_and_replaces_a_task_and_delete_removes_it(server):
    client, folder, spare, image = server
    response = client.put("/tasks/fresh", files=upload(spare / "fresh"))
    assert response.status_code == 201 and response.json()["served"], response.text
    v1 = response.json()["version"]
    answer = predict(client, "fresh", image).json()
    assert answer["version"] == v1
    assert answer["predictions"][0]["index"] == probabilities(spare / "fresh", image).argmax().item()
    response = client.put("/tasks/fresh", files=upload(spare / "fresh_v2"))
    assert response.status_code == 200 and response.json()["served"]
    v2 = response.json()["version"]
    assert v2 != v1 and predict(client, "fresh", image).json()["version"] == v2
    bad = upload(spare / "fresh")
    bad["model.safetensors"] = ("model.safetensors", b"not safetensors")
    response = client.put("/tasks/fresh", files=bad)
    assert response.status_code == 400 and "is not a safetensors file" in response.json()["detail"]
    assert predict(client, "fresh", image).json()["version"] == v2  # the served version is untouched
    assert client.put("/tasks/fresh", content=b"plain", headers={"Content-Type": "text/plain"}).status_code == 400
    response = client.delete("/tasks/fresh")
    assert response.status_code == 200 and response.json()["served"]
    assert not (folder / "fresh").exists()
    assert predict(client, "fresh", image).status_code == 400
    assert client.delete("/tasks/fresh").status_code == 404


def test_a_package_added_to_the_folder_is_served_within_two_seconds(server):
    client, folder, spare, image = server
    install_package(stage_package(folder, "dropped", package_files(spare / "dropped")), folder / "dropped")
    answered, seconds = eventually(lambda: predict(client, "dropped", image).status_code == 200, 2.0)
    assert answered, f"not served after {seconds:.1f} s"
    shutil.rmtree(folder / "dropped")


def test_admin_routes_are_refused_without_an_api_key_and_without_a_folder(tmp_path, monkeypatch):
    """In process: a server without a key refuses to change tasks (403); one without task folders has nowhere to
    write (409)."""
    from starlette.testclient import TestClient

    from vpt_lightning.serving.server import build_server
    from vpt_lightning.serving.task_store import TaskStore

    monkeypatch.delenv("LIT_SERVER_API_KEY", raising=False)
    write_package(tmp_path / "tasks" / "deep", 0, **TASKS["deep"])
    store = TaskStore(folders=[tmp_path / "tasks"])
    open_server = TestClient(build_server(store, accelerator="cpu").app)
    response = open_server.put("/tasks/x", files=upload(tmp_path / "tasks" / "deep"))
    assert response.status_code == 403 and "needs the server to require an API key" in response.json()["detail"]
    assert open_server.delete("/tasks/deep").status_code == 403 and (tmp_path / "tasks" / "deep").exists()
    memory = TaskStore(backbone=store.backbone_config)
    keyed = TestClient(build_server(memory, api_key="k", accelerator="cpu").app)
    assert keyed.delete("/tasks/deep", headers={"X-API-Key": "k"}).status_code == 409


def poisoned(folder: Path, target: Path) -> Path:
    """A copy of the package ``folder`` whose weights also hold a tensor of the shared backbone (issue 26: loaded,
    it changed every other task's answers)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, target)
    tensors = load_file(str(target / "model.safetensors"))
    tensors["backbone.model.blocks.0.attn.qkv.weight"] = torch.randn(96, 32) * 3
    save_file(tensors, str(target / "model.safetensors"))
    return target


def test_a_poisoned_package_uploaded_or_dropped_in_the_folder_is_refused_and_the_others_answer_alike(server, tmp_path):
    """The served store checks a package as loading one does: an upload holding a backbone tensor is refused (400,
    naming it; nothing written), the same package dropped into the folder gets 503 naming it at its use; the other
    tasks answer exactly as before."""
    client, folder, spare, image = server
    before = predict(client, "linear", image).json()
    evil = poisoned(spare / "fresh", tmp_path / "evil")
    response = client.put("/tasks/evil", files=upload(evil))
    assert response.status_code == 400 and "backbone.model.blocks.0.attn.qkv.weight" in response.json()["detail"]
    assert not (folder / "evil").exists()
    install_package(stage_package(folder, "evil", package_files(evil)), folder / "evil")
    try:
        refused, _ = eventually(lambda: predict(client, "evil", image).status_code == 503, 3.0)
        assert refused
        detail = predict(client, "evil", image).json()["detail"]
        assert "evil/model.safetensors" in detail and "backbone.model.blocks.0.attn.qkv.weight" in detail, detail
        assert predict(client, "linear", image).json() == before
    finally:
        shutil.rmtree(folder / "evil")
