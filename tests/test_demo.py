"""vpt-serve --ui: the Gradio demo page in a real headless browser (the system Chromium driven by Playwright):
upload an image, pick a task or all, read the top-5 labels and probabilities off the page."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_task_checkpoint, task_probabilities, write_image

from vpt_lightning.serving.launch import running_server

pytest.importorskip("litserve")
STARTUP_SECONDS = 240
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--no-first-run",
    "--mute-audio",
]
COUNT_CLASSES = ["one", "two", "three", "four", "five", "six"]
ORIENT_CLASSES = ["north", "east", "south"]
KEY = "demo-key-42"


def chromium() -> str:
    """The system Chromium (Debian's package); in CI its absence is a failure, elsewhere a skip saying why."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    reasons = []
    if not path:
        reasons.append("no Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/chromium)")
    try:
        import gradio  # noqa: F401
        import playwright  # noqa: F401
    except ImportError as err:
        reasons.append(f"{err.name} is not installed (pip install -e '.[dev]')")
    if reasons:
        if os.environ.get("CI"):
            pytest.fail("the browser test must run in CI: " + "; ".join(reasons))
        pytest.skip("; ".join(reasons))
    return path


def read_label(page, task: str):
    """(class, percent) rows of a task's label box as the page shows them."""
    text = page.locator(f"#label-{task}").inner_text()
    return [(name, int(pct)) for name, pct in re.findall(r"^(\w+)\s*\n?\s*(\d+)%$", text, flags=re.M)]


def expected(ckpt: Path, image: Path, names):
    top = task_probabilities(ckpt, image).topk(min(5, len(names)))
    return [(names[i], round(100 * p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]


def test_demo_page_in_a_headless_browser(tmp_path):
    executable = chromium()
    from playwright.sync_api import sync_playwright

    torch.manual_seed(0)
    count = save_task_checkpoint(tmp_path / "count.ckpt", num_classes=6, class_names=COUNT_CLASSES, task_name="count")
    orient = save_task_checkpoint(
        tmp_path / "orient.ckpt",
        num_classes=3,
        class_names=ORIENT_CLASSES,
        task_name="orient",
        prompt={"num_tokens": 3, "deep": False},
        tuning={"method": "vpt_shallow"},
    )
    image = tmp_path / "picture.png"
    write_image(image, seed=11, size=(48, 40))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
        "LIT_SERVER_API_KEY": KEY,
    }
    with (
        running_server(
            [count, orient], ["--accelerator", "cpu", "--ui"], startup_timeout=STARTUP_SECONDS, env=env
        ) as url,
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.set_default_timeout(60_000)
            page.goto(url + "/ui/")
            # with an API key, Gradio's login page asks for it (any user name)
            page.get_by_label("username").fill("me")
            page.get_by_label("password").fill(KEY)
            page.get_by_role("button", name="Login").click()

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
