"""vpt-serve --ui: the Gradio demo page in a real headless browser (the system Chromium driven by Playwright):
upload an image, pick a task or all, read the top-5 labels and probabilities off the page."""

from __future__ import annotations

import base64
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import pytest
import torch
from conftest import CHROMIUM_ARGS, chromium, save_task_checkpoint, task_probabilities, write_image

from vpt_lightning.serving.launch import running_server

pytest.importorskip("litserve")
STARTUP_SECONDS = 240
COUNT_CLASSES = ["one", "two", "three", "four", "five", "six"]
ORIENT_CLASSES = ["north", "east", "south"]
KEY = "demo-key-42"


def read_label(page, task: str):
    """(class, percent) rows of a task's label box as the page shows them."""
    text = page.locator(f"#label-{task}").inner_text()
    return [(name, int(pct)) for name, pct in re.findall(r"^(\w+)\s*\n?\s*(\d+)%$", text, flags=re.M)]


def expected(ckpt: Path, image: Path, names):
    top = task_probabilities(ckpt, image).topk(min(5, len(names)))
    return [(names[i], round(100 * p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """``vpt-serve --ui`` with an API key on two tasks: ``(url, count checkpoint, orient checkpoint, image)``."""
    pytest.importorskip("gradio")
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    count = save_task_checkpoint(root / "count.ckpt", num_classes=6, class_names=COUNT_CLASSES, task_name="count")
    orient = save_task_checkpoint(
        root / "orient.ckpt",
        num_classes=3,
        class_names=ORIENT_CLASSES,
        task_name="orient",
        prompt={"num_tokens": 3, "deep": False},
        tuning={"method": "vpt_shallow"},
    )
    image = root / "picture.png"
    write_image(image, seed=11, size=(48, 40))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
        "LIT_SERVER_API_KEY": KEY,
    }
    with running_server(
        [count, orient], ["--accelerator", "cpu", "--ui"], startup_timeout=STARTUP_SECONDS, env=env
    ) as url:
        yield url, count, orient, image


def test_demo_page_in_a_headless_browser(demo_server):
    executable = chromium("gradio")
    from playwright.sync_api import sync_playwright

    url, count, orient, image = demo_server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            # with an API key, the browser is asked for it (HTTP Basic authentication: any user name, the key)
            context = browser.new_context(
                viewport={"width": 1000, "height": 760}, http_credentials={"username": "me", "password": KEY}
            )
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(url + "/ui/")

            page.locator("input[type=file]").first.set_input_files(str(image))
            page.get_by_role("button", name="Classify").click()  # "all tasks" is the default
            page.wait_for_function(
                "document.querySelector('#label-orient') && /%/.test(document.querySelector('#label-orient').innerText)"
            )
            page.wait_for_function("/%/.test(document.querySelector('#label-count').innerText)")
            want_count, want_orient = expected(count, image, COUNT_CLASSES), expected(orient, image, ORIENT_CLASSES)
            for got, want in ((read_label(page, "count"), want_count), (read_label(page, "orient"), want_orient)):
                assert [name for name, _ in got] == [name for name, _ in want], (got, want)
                assert all(abs(a - b) <= 1 for (_, a), (_, b) in zip(got, want)), (got, want)
            assert len(read_label(page, "count")) == 5  # top-5 of six classes

            page.get_by_label("task").click()  # one task: only its box is shown
            page.get_by_role("option", name="orient").click()
            page.get_by_role("button", name="Classify").click()
            page.locator("#label-count").wait_for(state="hidden")
            assert [name for name, _ in read_label(page, "orient")] == [name for name, _ in want_orient]
        finally:
            browser.close()


def basic(password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"me:{password}".encode()).decode()}


def status_of(url: str, method: str = "GET", headers: Optional[dict] = None, timeout: float = 5) -> tuple:
    """(status, WWW-Authenticate) of a request whose answer's headers come within ``timeout`` s (a stream that
    opened counts: its status is read, the stream is closed)."""
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.headers.get("WWW-Authenticate")
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("WWW-Authenticate")


def test_no_demo_route_answers_without_the_key(demo_server):
    """With --api-key, every route under /ui needs the key: Gradio's own login left its heartbeat stream (and reset,
    cancel, upload progress...) open, so 2,000 never-ending streams were held without a credential."""
    url, _, _, _ = demo_server
    session = "attacker-session"
    streams = [f"/ui/gradio_api/heartbeat/{session}", f"/ui/gradio_api/queue/data?session_hash={session}"]
    pages = ["/ui", "/ui/", "/ui/config", "/ui/gradio_api/info", "/ui/gradio_api/startup-events", "/ui/theme.css"]
    posts = ["/ui/gradio_api/queue/join", "/ui/gradio_api/upload", "/ui/gradio_api/reset", "/ui/gradio_api/cancel"]
    for path, method in [(p, "GET") for p in streams + pages] + [(p, "POST") for p in posts]:
        for headers in (None, basic("wrong"), {"X-API-Key": "wrong"}):
            status, challenge = status_of(url + path, method, headers)
            assert (status, challenge) == (401, 'Basic realm="vpt-serve", charset="UTF-8"'), (path, headers)
    assert status_of(url + streams[0], headers=basic(KEY))[0] == 200  # with the key, the stream opens
    assert status_of(url + "/ui/", headers={"X-API-Key": KEY})[0] == 200
    assert status_of(url + "/health")[0] == 200  # the one open route


def test_every_route_of_the_served_app_but_health_needs_the_key(demo_server):
    """Every route the app has (LitServe's, ours, the demo page's), listed from the app itself, not by hand."""
    from starlette.routing import Mount

    from vpt_lightning.serving.multitask import MultiTaskClassifier
    from vpt_lightning.serving.server import build_server

    url, count, orient, _ = demo_server
    model = MultiTaskClassifier.from_checkpoints([count, orient])
    app = build_server(model, api_key=KEY, ui=True, docs=True, accelerator="cpu").app

    def routes(table, prefix=""):
        for route in table:
            if isinstance(route, Mount):
                yield from routes(route.routes, prefix + route.path)
            elif hasattr(route, "original_router"):  # FastAPI >= 0.165 keeps an included router as one entry
                yield from routes(route.original_router.routes, prefix + route.include_context.prefix)
            else:
                methods = sorted(getattr(route, "methods", None) or ["GET"])
                yield prefix + re.sub(r"\{[^}]*\}", "x", route.path), "GET" if "GET" in methods else methods[0]

    found = sorted(set(routes(app.routes)))
    assert len(found) > 50 and ("/ui/gradio_api/heartbeat/x", "GET") in found, found
    for path, method in found:
        if path != "/health":
            assert status_of(url + path.replace(" ", "%20"), method)[0] == 401, (path, method)
