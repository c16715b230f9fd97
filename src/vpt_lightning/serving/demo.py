"""The demo page of ``vpt-serve --ui``: a Gradio app mounted at ``/ui`` on the server's own FastAPI app.

Upload or drop an image, pick a task (or all of them) and see each task's top classes with their probabilities.
The page classifies through the server's own ``POST /predict`` (over loopback), so it gets the same batching, limits
and API key as any client. With an API key set, every route under ``/ui`` needs it (the server's
``ApiKeyMiddleware``): the browser asks for it (HTTP Basic authentication: any user name, the key as the
password). Gradio's own login is not used: it leaves routes open (its heartbeat and upload-progress streams, reset,
cancel...), so anyone could hold never-ending streams without the key. Nothing is shared publicly (no
``share=True``).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional, Sequence

from fastapi import FastAPI

from .task_store import TaskStore

UI_PATH = "/ui"
ALL_TASKS = "all tasks"
SHOWN_CLASSES = 5


def local_url(host: str, port: int) -> str:
    """The URL at which this machine reaches a server listening on ``host:port``."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def classify(
    predict_url: str, image_path: str, task: str, api_key: Optional[str], timeout: float = 60
) -> Dict[str, Any]:
    """POST the image file to ``predict_url`` for ``task``; returns the server's JSON answer (its ``detail`` as a
    :class:`ValueError` on a 4xx)."""
    with open(image_path, "rb") as handle:
        data = handle.read()
    headers = {"Content-Type": "application/octet-stream", **({"X-API-Key": api_key} if api_key else {})}
    query = urllib.parse.urlencode({"task": task, "top_k": SHOWN_CLASSES})
    request = urllib.request.Request(f"{predict_url}?{query}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read()).get("detail", err.reason)
        except ValueError:
            detail = err.reason
        raise ValueError(f"{task}: {detail}") from None


def build_demo(tasks: Sequence[str], predict_url: str, api_key: Optional[str] = None):
    """The Gradio Blocks: an image, a task choice and one label box per task (top-5 classes, probabilities)."""
    import gradio as gr

    with gr.Blocks(title="vpt-serve demo", analytics_enabled=False) as demo:
        gr.Markdown(
            "## Visual Prompt Tuning: classify an image\nEvery task shares one frozen backbone; pick one "
            "task or all of them."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="image", height=280)
                task = gr.Dropdown([ALL_TASKS, *tasks], value=ALL_TASKS, label="task")
                button = gr.Button("Classify", variant="primary")
            with gr.Column():
                labels = [
                    gr.Label(num_top_classes=SHOWN_CLASSES, label=name, elem_id=f"label-{name}") for name in tasks
                ]

        def run(image_path: Optional[str], chosen: str) -> List[Any]:
            if not image_path:
                raise gr.Error("upload an image first")
            wanted = list(tasks) if chosen == ALL_TASKS else [chosen]
            updates = []
            for name in tasks:
                if name not in wanted:
                    updates.append(gr.update(visible=False, value=None))
                    continue
                try:
                    answer = classify(predict_url, image_path, name, api_key)
                except ValueError as err:
                    raise gr.Error(str(err)) from None
                scores = {p["class"]: p["probability"] for p in answer["predictions"]}
                updates.append(gr.update(visible=True, value=scores))
            return updates

        button.click(run, inputs=[image, task], outputs=labels, api_name=False)
    return demo


def mount_demo(
    app: FastAPI,
    model: TaskStore,
    predict_url: str,
    api_key: Optional[str] = None,
    max_file_bytes: Optional[int] = None,
    path: str = UI_PATH,
) -> FastAPI:
    """Mount the demo page at ``path`` of ``app`` (never shared publicly). It classifies with ``api_key``; the key
    guarding the page itself is the server's middleware's, on every route under ``path``."""
    import gradio as gr

    demo = build_demo(model.task_names, predict_url, api_key)
    return gr.mount_gradio_app(
        app,
        demo,
        path=path,
        max_file_size=max_file_bytes,
        footer_links=[],
        run_history=False,
        ssr_mode=False,
    )
