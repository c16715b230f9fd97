"""The HTTP server of ``vpt-serve``: a LitServe API over a :class:`MultiTaskClassifier`, with dynamic batching
across tasks (LitServe gathers concurrent requests, whatever their task, into one forward pass).

Routes: ``POST /predict`` (a JSON body ``{"task": NAME, "image": BASE64, "top_k": K}``, or the raw image bytes
with ``?task=NAME[&top_k=K]`` and an ``image/*`` or ``application/octet-stream`` content type) -> ``{"task",
"predictions": [{"class", "index", "probability"}...]}``; ``GET /tasks`` -> the tasks with their classes;
LitServe's ``GET /health`` and ``GET /info``. Bad input gets a 4xx with a ``detail`` message.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Dict, List, Tuple

import litserve as ls
import torch
from fastapi import HTTPException
from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .images import ImageError, check_top_k, decode_image, task_transforms, top_k
from .multitask import MultiTaskClassifier

PREDICT_PATH = "/predict"
TASKS_PATH = "/tasks"
RAW_TYPES = ("image/", "application/octet-stream")


class MultiTaskAPI(ls.LitAPI):
    """LitServe API: decode and transform each request's image for its task, classify batches of mixed tasks."""

    def __init__(
        self,
        model: MultiTaskClassifier,
        default_top_k: int = 5,
        max_batch_size: int = 32,
        batch_timeout: float = 0.01,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=PREDICT_PATH)
        self.model = model
        self.default_top_k = check_top_k(default_top_k)

    def setup(self, device: str) -> None:
        self.model = self.model.to(device).eval()
        self.transforms = task_transforms(self.model)
        self.task_index = {name: i for i, name in enumerate(self.model.task_names)}
        self.names = self.model.task_names

    def decode_request(self, request) -> Tuple[torch.Tensor, int, int]:  # unannotated: LitServe passes the JSON
        if not isinstance(request, dict):
            raise HTTPException(400, f"the JSON body must be an object with 'task' and 'image', got {type(request).__name__}")
        task = request.get("task")
        if task is None and len(self.names) == 1:
            task = self.names[0]
        if task not in self.task_index:
            raise HTTPException(400, f"task={task!r} is not one of {self.names}")
        try:
            k = check_top_k(request.get("top_k", self.default_top_k))
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        encoded = request.get("image")
        if not isinstance(encoded, str):
            raise HTTPException(400, "'image' must be the image file's bytes as a base64 string")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as err:
            raise HTTPException(400, f"'image' is not valid base64: {err}") from None
        try:
            image = decode_image(data, "image")
        except ImageError as err:
            raise HTTPException(413 if err.too_large else 400, str(err)) from None
        return self.transforms[task](image), self.task_index[task], k

    def batch(self, inputs: List[Tuple[torch.Tensor, int, int]]) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        images, tasks, ks = zip(*inputs)
        return torch.stack(images), torch.tensor(tasks, dtype=torch.long), list(ks)

    def predict(self, batch: Tuple[torch.Tensor, torch.Tensor, List[int]]) -> List[Dict[str, Any]]:
        images, tasks, ks = batch
        device = next(self.model.model.parameters()).device
        with torch.inference_mode():
            probabilities = self.model(images.to(device), tasks.to(device)).float().softmax(dim=-1).cpu()
        out = []
        for probs, t, k in zip(probabilities, tasks.tolist(), ks):
            info = self.model.infos[self.names[t]]
            out.append({"task": info.name, "predictions": top_k(probs, info, k)})
        return out

    def unbatch(self, output: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return output

    def encode_response(self, output: Dict[str, Any]):  # unannotated: FastAPI sends the dict as JSON
        return output


class RequestBodyMiddleware:
    """ASGI middleware for ``POST /predict``: refuses bodies over ``max_bytes`` (413) and malformed JSON (400), and
    turns a raw image upload (``?task=NAME``) into the JSON body the API reads. Other routes pass through."""

    def __init__(self, app: ASGIApp, max_bytes: int, path: str = PREDICT_PATH) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, 413, f"request body of {declared} bytes is over {self.max_bytes}")
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send, 413, f"request body is over {self.max_bytes} bytes")
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type.startswith(RAW_TYPES):
            query = QueryParams(scope.get("query_string", b"").decode("latin-1"))
            payload: Dict[str, Any] = {"image": base64.b64encode(body).decode("ascii")}
            if "task" in query:
                payload["task"] = query["task"]
            if "top_k" in query:
                if not query["top_k"].isdigit():
                    return await self._refuse(scope, receive, send, 400, f"top_k={query['top_k']!r} must be a positive integer")
                payload["top_k"] = int(query["top_k"])
            body = json.dumps(payload).encode()
        elif content_type in ("application/json", ""):
            try:
                json.loads(body)
            except ValueError as err:
                return await self._refuse(scope, receive, send, 400, f"malformed JSON body: {err}")
        else:
            return await self._refuse(
                scope, receive, send, 415,
                f"content type {content_type!r}: send JSON (application/json) or raw image bytes (image/* or "
                "application/octet-stream)",
            )
        new_headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
        new_headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": new_headers}, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


def build_server(
    model: MultiTaskClassifier,
    default_top_k: int = 5,
    max_batch_size: int = 32,
    batch_timeout: float = 0.01,
    max_request_bytes: int = 16 * 2**20,
    accelerator: str = "auto",
    devices: Any = 1,
    timeout: float = 30,
) -> ls.LitServer:
    """The LitServer: the API, the request-body middleware and the ``/tasks`` route."""
    api = MultiTaskAPI(model, default_top_k, max_batch_size, batch_timeout)
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        timeout=timeout,
        middlewares=[(RequestBodyMiddleware, {"max_bytes": max_request_bytes})],
        model_metadata={"tasks": model.task_names, "backbone": model.backbone_config.name},
    )
    tasks = {"tasks": [info.to_dict() for info in model.infos.values()]}

    def list_tasks() -> Dict[str, Any]:
        """The served tasks with their classes."""
        return tasks

    server.app.add_api_route(TASKS_PATH, list_tasks, methods=["GET"])
    return server


def serve(model: MultiTaskClassifier, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          **server_options: Any) -> None:
    """Build the server and run it until interrupted."""
    build_server(model, **server_options).run(
        host=host, port=port, log_level=log_level, generate_client_file=False, num_api_servers=1
    )
