"""The HTTP server of ``vpt-serve``: a LitServe API over a :class:`~vpt_lightning.serving.task_store.TaskStore`
(tasks given at start, and task folders loaded on demand), with dynamic batching across tasks (LitServe gathers
concurrent requests, whatever their task, into one forward pass).

Routes: ``POST /predict`` (a JSON body ``{"task": NAME, "image": BASE64, "top_k": K}``, or the raw image bytes
with ``?task=NAME[&top_k=K]`` and an ``image/*`` or ``application/octet-stream`` content type) -> ``{"task",
"version", "predictions": [{"class", "index", "probability"}...]}``; ``GET /tasks`` -> a page of the tasks with
their classes and states, ``GET /tasks/NAME``, and with an API key ``PUT /tasks/NAME`` (a package upload) and
``DELETE /tasks/NAME`` (:mod:`~vpt_lightning.serving.task_admin`); LitServe's ``GET /health`` and ``GET /info``.
Bad input gets a 4xx with a ``detail`` message: 400 for anything malformed, 401 without the API key, 408 for
headers or a body not sent within the read timeout (:mod:`~vpt_lightning.serving.header_deadline` for the
headers), 413 for a body or image over its limit, 415 for another content type; 503 (with ``Retry-After``) for a
body that would take the bodies held at once over their cap, and for a task whose package cannot be loaded.

Lifecycle: LitServe's ``run`` (the main process) starts a multiprocessing manager, spawns the inference worker(s)
and forks the uvicorn process(es), then blocks on the manager's shutdown event; it stops them only on a
``KeyboardInterrupt``. SIGTERM's default action killed the main process alone, so the uvicorn process went on
serving and the workers, their manager gone, spun in LitServe's loop. :func:`serve` therefore turns SIGTERM into
that same interrupt, and :class:`GracefulLitServer` stops the uvicorn processes first (no new connections; the
requests in flight are answered while the workers still run), then the workers and the manager.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import hmac
import ipaddress
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import litserve as ls
import torch
from fastapi import HTTPException
from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .demo import UI_PATH
from .header_deadline import DEFAULT_READ_TIMEOUT, HeaderDeadlineProtocol
from .images import MAX_IMAGE_PIXELS, EvalTransforms, ImageError, check_top_k, decode_image, parse_top_k, top_k
from .task_admin import MAX_PACKAGE_BYTES, StatusBoard, TaskRoutes
from .task_store import TaskHandle, TaskStore, TaskUnavailable

log = logging.getLogger(__name__)

PREDICT_PATH = "/predict"
TASKS_PATH = "/tasks"
HEALTH_PATH = "/health"
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
RAW_TYPES = ("image/", "application/octet-stream")
#: the environment variable LitServe reads its API key from (``litserve.server.LIT_SERVER_API_KEY``)
API_KEY_ENV = "LIT_SERVER_API_KEY"
API_KEY_HEADER = "X-API-Key"
#: request bodies of the largest size held at once by default (``--max-buffered-bytes``)
BUFFERED_REQUESTS = 4
#: seconds a client refused for lack of body budget (503) is told to wait
RETRY_AFTER_SECONDS = 1
MANAGER_NAME = "LitServe's manager process"


class Sample(NamedTuple):
    """A decoded request: its transformed image, the task version opened for it and the number of classes to
    return."""

    image: torch.Tensor
    task: TaskHandle
    k: int


class Refused(NamedTuple):
    """A request refused while decoding: the HTTP status and the message."""

    status: int
    detail: str


class MultiTaskAPI(ls.LitAPI):
    """LitServe API: decode and transform each request's image for its task, classify batches of mixed tasks."""

    def __init__(
        self,
        model: TaskStore,
        default_top_k: int = 5,
        max_batch_size: int = 32,
        batch_timeout: float = 0.01,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        status_folder: Optional[str] = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=PREDICT_PATH)
        self.model = model
        self.default_top_k = check_top_k(default_top_k)
        self.max_image_pixels = max_image_pixels
        self.status_folder = status_folder

    def setup(self, device: str) -> None:
        if multiprocessing.parent_process() is not None:  # LitServe's inference worker
            exit_with_parent()
        self.model = self.model.to(device).eval()
        self.transforms = EvalTransforms(self.model)  # built per distinct settings: tasks prepared alike share one
        self.model.watch()  # the task folders' changes, seen within a poll
        if self.status_folder is not None:
            StatusBoard(self.status_folder).start_publishing(self.model)

    def authorize(self) -> None:
        """LitServe's per-route check, a no-op: :class:`ApiKeyMiddleware` checks the key on every route but
        ``/health`` (LitServe's own check, on its environment variable, would guard ``/health`` and not ``/tasks``)."""

    def decode_request(self, request) -> Union[Sample, Refused]:  # unannotated: LitServe passes the JSON
        """The request's transformed image, task and k, or why it is refused: refusals travel through the batch
        as values, since an exception here would fail every request LitServe batched with this one."""
        try:
            return self._decode(request)
        except HTTPException as err:
            return Refused(err.status_code, str(err.detail))
        except Exception as err:  # a transform failing on an odd image: this request's error, not the batch's
            log.exception("decoding a request failed")
            return Refused(400, f"the image could not be prepared ({type(err).__name__}: {err})")

    def _decode(self, request: Any) -> Sample:
        if not isinstance(request, dict):
            raise HTTPException(
                400, f"the JSON body must be an object with 'task' and 'image', got {type(request).__name__}"
            )
        task = request.get("task")
        if task is None and len(self.model) == 1:
            task = self.model.task_names[0]
        if not isinstance(task, str):
            raise HTTPException(400, f"'task' must be a string, {self._names()}; got {type(task).__name__}")
        if task not in self.model:
            raise HTTPException(400, f"task={task!r} is not {self._names()}")
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
            image = decode_image(data, "image", self.max_image_pixels)
        except ImageError as err:
            raise HTTPException(413 if err.too_large else 400, str(err)) from None
        try:
            handle = self.model.open(task)  # the version this request is answered by
        except TaskUnavailable as err:
            raise HTTPException(503, str(err)) from None
        except ValueError as err:  # removed meanwhile
            raise HTTPException(400, str(err)) from None
        try:
            return Sample(self.transforms(handle.info)(image), handle, k)
        except BaseException:
            self.model.release([handle])
            raise

    def _names(self) -> str:
        """The valid task names, for an error message (the count past 20)."""
        names = self.model.task_names
        return f"one of {names}" if len(names) <= 20 else f"one of the {len(names)} tasks (GET /tasks lists them)"

    def batch(self, inputs: List[Union[Sample, Refused]]) -> List[Union[Sample, Refused]]:
        return list(inputs)

    def predict(self, batch: Union[List[Union[Sample, Refused]], Sample, Refused]) -> Any:
        """Classify the batch's valid samples in one pass; refused ones keep their place (a single request when
        LitServe does not batch, ``max_batch_size=1``)."""
        single = not isinstance(batch, list)
        items = [batch] if single else batch
        valid = [i for i, x in enumerate(items) if isinstance(x, Sample)]
        out: List[Any] = list(items)
        if valid:
            handles = [items[i].task for i in valid]
            try:
                images = torch.stack([items[i].image for i in valid])
                device = next(self.model.backbone.parameters()).device
                with torch.inference_mode():
                    probabilities = self.model.classify(images.to(device), handles).float().softmax(dim=-1).cpu()
            finally:
                self.model.release(handles)
            for i, probs, handle in zip(valid, probabilities, handles):
                info = handle.info
                out[i] = {"task": info.name, "version": handle.version, "predictions": top_k(probs, info, items[i].k)}
        return out[0] if single else out

    def unbatch(self, output: List[Any]) -> List[Any]:
        return output

    def encode_response(self, output: Any):  # unannotated: FastAPI sends the dict as JSON, a Response as it is
        if isinstance(output, Refused):
            return JSONResponse({"detail": output.detail}, status_code=output.status)
        return output


def exit_with_parent(poll_seconds: float = 0.5) -> None:
    """End this process when its parent dies (an inference worker whose server was killed with SIGKILL would
    otherwise spin on its dead manager's queue for ever)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str, headers=None) -> None:
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


class ApiKeyMiddleware:
    """Every HTTP and WebSocket route but ``open_paths`` needs the key (401 otherwise): in the header
    ``X-API-Key: KEY``, or as the password of HTTP Basic authentication (any user name), which a browser asks for
    itself on the paths under ``browser_prefix`` (the demo page, whose every route is guarded so, its streams too).
    Routes LitServe does not guard (``/tasks``, the API docs, the demo page) are guarded too."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str,
        open_paths: Iterable[str] = (HEALTH_PATH,),
        browser_prefix: str = UI_PATH,
    ) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.open_paths = set(open_paths)
        self.browser_prefix = browser_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        path = scope["path"]
        for_browser = path == self.browser_prefix or path.startswith(self.browser_prefix + "/")
        challenge = 'Basic realm="vpt-serve", charset="UTF-8"' if for_browser else API_KEY_HEADER
        detail = f"missing or wrong {API_KEY_HEADER} header" + (
            " (or the key as the password of HTTP Basic authentication)" if for_browser else ""
        )
        await _refuse(scope, receive, send, 401, detail, {"WWW-Authenticate": challenge})

    def authorized(self, scope: Scope) -> bool:
        """Whether the request carries the key, in ``X-API-Key`` or as a Basic password (compared in constant time)."""
        headers = dict(scope["headers"])
        if hmac.compare_digest(headers.get(API_KEY_HEADER.lower().encode(), b""), self.api_key):
            return True
        return hmac.compare_digest(basic_password(headers.get(b"authorization", b"")), self.api_key)


def basic_password(authorization: bytes) -> bytes:
    """The password of an ``Authorization: Basic BASE64(USER:PASSWORD)`` header, ``b""`` for any other."""
    scheme, _, credentials = authorization.partition(b" ")
    if scheme.lower() != b"basic":
        return b""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b""
    return decoded.partition(b":")[2]


class BodyBudget:
    """The bytes of request bodies this process holds at once (buffered, or answered from), against a cap: a
    request whose body would go over it is refused, never buffered (one budget per uvicorn process). It counts each
    body once; the memory they take is a small multiple of that (base64 and JSON copies on the way to the worker)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.held = 0

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes if they fit under the cap; whether they did."""
        if self.held + size > self.cap:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size


def content_length(headers: Dict[str, str]) -> Optional[int]:
    """The ``content-length`` header's value, None without one; :class:`ValueError` unless it is ASCII digits
    (``str.isdigit`` accepts '²', which ``int`` refuses)."""
    declared = headers.get("content-length")
    if declared is None:
        return None
    if not (declared.isascii() and declared.isdigit()):
        raise ValueError(f"content-length {declared[:20]!r} is not a number of bytes")
    return int(declared)


class RequestBodyMiddleware:
    """ASGI middleware for the routes that take a body: ``POST /predict`` (bodies up to ``max_bytes``) and, when
    ``max_upload_bytes`` is set (a server whose admin routes are open), ``PUT /tasks/NAME`` (package uploads up to
    ``max_upload_bytes``). It refuses bodies over their cap (413), not received within ``read_timeout`` seconds
    (408), over what ``budget`` lets this process hold at once, both kinds together (503 with ``Retry-After``,
    without reading them), a ``content-length`` that is not ASCII digits (400) and, for ``/predict``, malformed JSON
    (400, deep nesting included); it turns a raw image upload (``?task=NAME``) into the JSON body the API reads, and
    passes an upload on as it came. Other routes pass through (a ``PUT`` then reaches a route that refuses it
    unread)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_buffered_bytes: Optional[int] = None,
        path: str = PREDICT_PATH,
        max_upload_bytes: int = 0,
        upload_prefix: str = TASKS_PATH + "/",
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        self.budget = BodyBudget(buffered_bytes_cap(max_bytes, max_buffered_bytes, max_upload_bytes))
        self.path = path
        self.max_upload_bytes = max_upload_bytes
        self.upload_prefix = upload_prefix

    def _limit(self, scope: Scope) -> Optional[Tuple[int, str]]:
        """The body cap of this request's route and the option that sets it; ``None`` for a route without a body."""
        if scope["type"] != "http":
            return None
        if scope["method"] == "POST" and scope["path"] == self.path:
            return self.max_bytes, "--max-request-bytes"
        if self.max_upload_bytes and scope["method"] == "PUT" and scope["path"].startswith(self.upload_prefix):
            return self.max_upload_bytes, "--max-package-bytes"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self._limit(scope)
        if limit is None:
            await self.app(scope, receive, send)
            return
        max_bytes, option = limit
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            declared = content_length(headers)
        except ValueError as err:
            return await _refuse(scope, receive, send, 400, str(err))
        if declared is not None and declared > max_bytes:
            return await _refuse(
                scope, receive, send, 413, f"request body of {declared} bytes is over {max_bytes} ({option})"
            )
        held = 0  # bytes of the budget this request holds: the declared length, or what came so far
        try:
            if declared is not None:
                if not self.budget.take(declared):
                    return await self._busy(scope, receive, send)
                held = declared
            chunks, size, more = [], 0, True
            deadline = time.monotonic() + self.read_timeout
            while more:
                try:
                    message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    return await _refuse(
                        scope, receive, send, 408, f"request body not received within {self.read_timeout:g} s"
                    )
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > max_bytes:
                    return await _refuse(
                        scope, receive, send, 413, f"request body is over {max_bytes} bytes ({option})"
                    )
                if size > held:  # a body without content-length (chunked): held as it comes
                    if not self.budget.take(size - held):
                        return await self._busy(scope, receive, send)
                    held = size
            body = b"".join(chunks)
            del chunks  # one copy of the body held while it is answered
            if scope["path"] == self.path:
                try:
                    body = json_body(body, headers, scope)
                except HTTPException as err:
                    return await _refuse(scope, receive, send, err.status_code, str(err.detail))
                scope = replace_body(scope, body)
            await self.app(scope, replay(body, receive), send)
        finally:
            self.budget.give_back(held)

    async def _busy(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _refuse(
            scope,
            receive,
            send,
            503,
            f"the server holds {self.budget.held} bytes of request bodies, and this one would take it over its cap "
            f"of {self.budget.cap} (--max-buffered-bytes): retry later",
            {"Retry-After": str(RETRY_AFTER_SECONDS)},
        )


def json_body(body: bytes, headers: Dict[str, str], scope: Scope) -> bytes:
    """The JSON body the API reads: a raw image upload (``image/*``, ``application/octet-stream``) as
    ``{"image": BASE64, "task": ..., "top_k": ...}`` from the query, JSON as it is once checked; an
    :class:`HTTPException` (400 malformed, 415 another content type) otherwise."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith(RAW_TYPES):
        query = QueryParams(scope.get("query_string", b"").decode("latin-1"))
        payload: Dict[str, Any] = {"image": base64.b64encode(body).decode("ascii")}
        if "task" in query:
            payload["task"] = query["task"]
        if "top_k" in query:
            try:
                payload["top_k"] = parse_top_k(query["top_k"])
            except ValueError as err:
                raise HTTPException(400, str(err)) from None
        return json.dumps(payload).encode()
    if content_type in ("application/json", ""):
        try:
            json.loads(body)
        except RecursionError:
            raise HTTPException(400, "malformed JSON body: nested too deeply") from None
        except ValueError as err:  # UnicodeDecodeError too
            raise HTTPException(400, f"malformed JSON body: {err}") from None
        return body
    raise HTTPException(
        415,
        f"content type {content_type!r}: send JSON (application/json) or raw image bytes (image/* or "
        "application/octet-stream)",
    )


def replace_body(scope: Scope, body: bytes) -> Scope:
    """``scope`` with the headers of a JSON body of ``len(body)`` bytes."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {**scope, "headers": headers}


def replay(body: bytes, receive: Receive) -> Receive:
    """An ASGI ``receive`` that gives ``body`` once, then passes on to ``receive`` (a disconnect)."""
    sent = False

    async def receive_body() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_body


class ChildDied(RuntimeError):
    """A process of the server (uvicorn, an inference worker, LitServe's manager) ended on its own while serving
    (an OOM kill, a crash): the server stopped, and ``vpt-serve`` exits with an error for its supervisor."""


class GracefulLitServer(ls.LitServer):
    """A LitServer whose shutdown answers the requests in flight: the uvicorn processes are stopped first (SIGTERM:
    uvicorn closes its socket and finishes its open requests within ``uvicorn_graceful_timeout``) while the
    inference workers still run; LitServe then stops the workers and its manager.

    It also watches every process it started, in place of LitServe's monitor (which watches the inference workers
    only and, when one dies, stops the others but leaves ``run`` waiting on the manager it shut down; a dead uvicorn
    process it does not see: the port went on accepting connections that nobody answered). The first to end on its
    own stops the server as a shutdown request does; :attr:`child_died` then says which and how."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.child_died: Optional[str] = None
        self._watched: List[tuple] = []  # (name, process) of every process the server started
        self._manager_process: Any = None
        self._stopping = threading.Event()

    def _start_worker_monitoring(self, manager, uvicorn_workers) -> None:  # LitServe's hook, called by run()
        self._watched = [("the uvicorn process", w) for w in uvicorn_workers.values() if hasattr(w, "sentinel")]
        self._watched += [("the inference worker", w) for w in self.inference_workers]
        self._manager_process = getattr(manager, "_process", None)  # where multiprocessing keeps it
        if self._manager_process is not None:
            self._watched.append((MANAGER_NAME, self._manager_process))
        threading.Thread(target=self._watch, daemon=True, name="vpt-serve-watch").start()

    def _watch(self) -> None:
        ended = multiprocessing.connection.wait([process.sentinel for _, process in self._watched])
        if self._stopping.is_set():  # stopped on purpose
            return
        self._note_ended_child(ended)
        try:
            self._shutdown_event.set()  # run() wakes up and shuts the server down
        except (OSError, EOFError):  # the manager is the one that died: run() woke up on its broken connection
            pass

    def _note_ended_child(self, ended: Sequence[Any] = ()) -> None:
        """Set :attr:`child_died` from the first watched process that has ended, if any and not set yet.
        ``ended``: sentinels found ready; their processes are reaped first (a process's sentinel is ready as soon as
        its files are closed on exit, a moment before it can be waited for: ``is_alive`` may still say True)."""
        for name, process in self._watched:
            if self.child_died is not None:
                return
            if process.sentinel in ended:
                process.join(timeout=5)
            if not process.is_alive():
                self.child_died = f"{name} (pid {process.pid}) {how_it_ended(process.exitcode)}"

    def lost_manager(self, timeout: float = 5) -> bool:
        """Whether LitServe's manager process has ended (waiting up to ``timeout`` s), when ``run`` lost its
        connection to it; :attr:`child_died` then names it, unless another process died first. (``run`` can lose the
        connection before the manager's exit is seen, so that the shutdown found no process ended.)"""
        if self._manager_process is None:
            return False
        self._manager_process.join(timeout)
        if self._manager_process.is_alive():
            return False
        if self.child_died is None:
            self.child_died = (
                f"{MANAGER_NAME} (pid {self._manager_process.pid}) {how_it_ended(self._manager_process.exitcode)}"
            )
        return True

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason: str = "normal") -> None:
        self._note_ended_child()  # before any is stopped on purpose
        self._stopping.set()
        _stop_processes(
            [w for w in uvicorn_workers.values() if hasattr(w, "terminate")], timeout=self.uvicorn_graceful_timeout + 1
        )
        super()._perform_graceful_shutdown(manager, {}, shutdown_reason)


def how_it_ended(exitcode: Optional[int]) -> str:
    """``"was killed by SIGKILL"``, ``"exited with status 1"`` (a process's ``exitcode``)."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def buffered_bytes_cap(
    max_request_bytes: int, max_buffered_bytes: Optional[int] = None, max_upload_bytes: int = 0
) -> int:
    """The cap on request-body bytes held at once: ``max_buffered_bytes``, by default :data:`BUFFERED_REQUESTS`
    bodies of ``max_request_bytes`` or one package upload of ``max_upload_bytes`` (0: no upload route), whichever is
    more; :class:`ValueError` if a body of the largest size would not fit."""
    default = max(BUFFERED_REQUESTS * max_request_bytes, max_upload_bytes)
    cap = default if max_buffered_bytes is None else max_buffered_bytes
    for largest, option in ((max_request_bytes, "--max-request-bytes"), (max_upload_bytes, "--max-package-bytes")):
        if cap < largest:
            raise ValueError(
                f"--max-buffered-bytes {cap} is less than {option} {largest}: no request of the largest size could "
                "ever be served"
            )
    return cap


def resolve_api_key(api_key: Optional[str]) -> Optional[str]:
    """``--api-key``, else LitServe's environment variable; both set to different keys is an error."""
    from_env = os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key:
        raise ValueError("--api-key must not be empty")
    if api_key and from_env and api_key != from_env:
        raise ValueError(f"--api-key and the environment variable {API_KEY_ENV} hold different keys; set one")
    return api_key or from_env


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def exposure_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    """The warning for a server reachable from other hosts without an API key (None when there is nothing to say)."""
    if api_key or is_loopback(host):
        return None
    return (
        f"listening on {host} without an API key: anyone who reaches this host can use the server "
        f"(set --api-key or the environment variable {API_KEY_ENV})"
    )


def build_server(
    model: TaskStore,
    default_top_k: int = 5,
    max_batch_size: int = 32,
    batch_timeout: float = 0.01,
    max_request_bytes: int = 16 * 2**20,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_buffered_bytes: Optional[int] = None,
    api_key: Optional[str] = None,
    docs: bool = False,
    ui: bool = False,
    server_url: str = "http://127.0.0.1:8000",
    accelerator: str = "auto",
    devices: Any = 1,
    timeout: float = 30,
    shutdown_timeout: float = 5,
    max_package_bytes: int = MAX_PACKAGE_BYTES,
    status_folder: Optional[str] = None,
) -> ls.LitServer:
    """The LitServer: the API, the request-body middleware (bodies up to ``max_request_bytes``, and
    ``max_buffered_bytes`` of them at once, default :data:`BUFFERED_REQUESTS` times as much), the task routes
    (:func:`add_task_routes`), the API key on every route but ``/health`` (``api_key``), the API docs (only with
    ``docs``) and the demo page (``ui``, mounted at ``/ui``; it classifies through ``server_url``'s ``/predict``,
    and with a key the browser asks for it: HTTP Basic authentication, any user name, the key as the password).
    ``status_folder``: where the inference worker publishes its store's state for the task routes (a temporary
    folder :func:`serve` makes); without it the routes read ``model`` itself (a server run in this process)."""
    api = MultiTaskAPI(model, default_top_k, max_batch_size, batch_timeout, max_image_pixels, status_folder)
    max_upload_bytes = upload_bytes(model, api_key, max_package_bytes)
    body_limits = {
        "max_bytes": max_request_bytes,
        "read_timeout": read_timeout,
        "max_buffered_bytes": buffered_bytes_cap(max_request_bytes, max_buffered_bytes, max_upload_bytes),
        "max_upload_bytes": max_upload_bytes,
    }
    middlewares: List[Any] = [(RequestBodyMiddleware, body_limits)]
    if api_key:  # added last: the outermost, so that nothing answers before the key is checked
        middlewares.append((ApiKeyMiddleware, {"api_key": api_key}))
    server = GracefulLitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        timeout=timeout,
        middlewares=middlewares,
        model_metadata={"tasks": model.task_names, "backbone": model.backbone_config.name},
        disable_openapi_url=not docs,
    )
    server.uvicorn_graceful_timeout = shutdown_timeout
    if not docs:
        server.app.docs_url = server.app.redoc_url = None
        server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) not in DOCS_PATHS]
    board = StatusBoard(status_folder) if status_folder is not None else None
    add_task_routes(server, TaskRoutes(model, board, bool(api_key)))
    if ui:
        from .demo import mount_demo

        mount_demo(server.app, model, server_url + PREDICT_PATH, api_key=api_key, max_file_bytes=max_request_bytes)
    return server


def upload_bytes(model: TaskStore, api_key: Optional[str], max_package_bytes: int) -> int:
    """The largest package upload (``PUT /tasks/NAME``) the body middleware reads: ``max_package_bytes`` where the
    admin routes are open (an API key, a task folder to write), else 0 (the route refuses such a request unread)."""
    return max_package_bytes if api_key and model.folders else 0


def add_task_routes(server: ls.LitServer, routes: TaskRoutes) -> None:
    """``GET /tasks`` (a page: ``?offset=&limit=``), ``GET /tasks/NAME``, ``PUT /tasks/NAME`` and
    ``DELETE /tasks/NAME`` (see :mod:`~vpt_lightning.serving.task_admin`)."""
    app = server.app
    app.add_api_route(TASKS_PATH, routes.list_tasks, methods=["GET"])
    app.add_api_route(TASKS_PATH + "/{name}", routes.get_task, methods=["GET"])
    app.add_api_route(TASKS_PATH + "/{name}", routes.put_task, methods=["PUT"])
    app.add_api_route(TASKS_PATH + "/{name}", routes.delete_task, methods=["DELETE"])


PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a process gets when the thread that forked it ends
_serving_pid: Optional[int] = None  # the process running serve()
_forking_pid: Optional[int] = None  # the process that forked (read in the child)


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _end_with_server() -> None:
    """In a process that :func:`serve`'s process forks (LitServe's manager and uvicorn processes): have Linux send it
    SIGTERM when the server's process dies, so a SIGKILLed ``vpt-serve`` leaves nothing listening or waiting."""
    if _serving_pid is None or _forking_pid != _serving_pid or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):  # pragma: no cover - no prctl in this libc
        return
    if os.getppid() != _serving_pid:  # the server died between the fork and prctl
        os.kill(os.getpid(), signal.SIGTERM)


_fork_hooks_registered = False


def _stop_forked_processes_with_this_one(serving: bool = True) -> None:
    """While ``serving``, the processes this one forks end when it dies (see :func:`_end_with_server`)."""
    global _serving_pid, _fork_hooks_registered
    if not _fork_hooks_registered:  # once per process: fork hooks cannot be unregistered
        os.register_at_fork(before=_before_fork, after_in_child=_end_with_server)
        _fork_hooks_registered = True
    _serving_pid = os.getpid() if serving else None


def serve(
    model: TaskStore,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    warn_exposure: bool = True,
    **server_options: Any,
) -> None:
    """Build the server and run it until SIGTERM or SIGINT (Ctrl+C), then stop it gracefully: the requests in
    flight are answered, every process it started has ended when this returns. When one of them ends on its own
    (uvicorn, an inference worker, LitServe's manager), the others are stopped and :class:`ChildDied` says which.
    Warns when ``host`` is not a loopback address and no API key is set."""
    server_options["api_key"] = resolve_api_key(server_options.get("api_key"))
    warning = exposure_warning(host, server_options["api_key"])
    if warning and warn_exposure:
        warnings.warn(warning, stacklevel=2)
    if server_options.get("ui"):
        from .demo import local_url

        server_options.setdefault("server_url", local_url(host, port))
    status_folder = new_status_folder()  # the worker's store state, for the task routes
    server = build_server(model, status_folder=status_folder, **server_options)
    owner = os.getpid()
    stopping = False

    def interrupt(signum, frame) -> None:
        nonlocal stopping
        if os.getpid() != owner:  # a forked child before it installs its own handlers: the default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if stopping:
            log.warning("vpt-serve: already stopping (signal %s ignored)", signum)
            return
        stopping = True
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    _stop_forked_processes_with_this_one()
    try:
        # the request line and headers get the body's deadline too (read by the forked uvicorn process)
        HeaderDeadlineProtocol.header_timeout = float(server_options.get("read_timeout", DEFAULT_READ_TIMEOUT))
        server.run(
            host=host,
            port=port,
            log_level=log_level,
            generate_client_file=False,
            num_api_servers=1,
            http=HeaderDeadlineProtocol,
        )
    except KeyboardInterrupt:  # a signal during start-up, before LitServe's own handling: stop what it started
        _stop_processes(getattr(server, "inference_workers", []))
    except (EOFError, ConnectionError):  # run() waits on LitServe's manager: its connection broke, it died
        if not server.lost_manager():
            raise
    finally:
        _stop_forked_processes_with_this_one(serving=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(status_folder, ignore_errors=True)
    if server.child_died:
        raise ChildDied(f"{server.child_died}: the server stopped")


STATUS_PREFIX = "vpt-serve-"  # a server's status folder in the temporary folder: vpt-serve-<pid>-<random>
STATUS_NAME = re.compile(rf"{STATUS_PREFIX}([0-9]+)-.+")


def new_status_folder() -> str:
    """A new status folder for this server, named after its process, once the folders of servers that were killed
    before they could remove their own (SIGKILL, the OOM killer) are removed (:func:`remove_stale_status_folders`)."""
    remove_stale_status_folders()
    return tempfile.mkdtemp(prefix=f"{STATUS_PREFIX}{os.getpid()}-")


def remove_stale_status_folders(root: Optional[str] = None) -> List[str]:
    """Remove this user's ``vpt-serve-<pid>-*`` folders under ``root`` (the temporary folder) whose process has
    ended; returns their paths. A symbolic link, another user's folder or one of a running process is left."""
    root = root or tempfile.gettempdir()
    removed = []
    for entry in os.scandir(root):
        match = STATUS_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        if entry.stat(follow_symlinks=False).st_uid != os.getuid() or _process_runs(int(match.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def _process_runs(pid: int) -> bool:
    """Whether process ``pid`` runs (another user's, or a number no pid can be: taken as running, not ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass
    return True


def _stop_processes(processes: Iterable[Any], timeout: float = 5) -> None:
    """SIGTERM to each of ``processes``, then SIGKILL to each still alive ``timeout`` seconds later."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=timeout)
        if process.is_alive():
            log.warning("process %s did not stop within %g s: killing it", process.pid, timeout)
            process.kill()
            process.join(timeout=2)
