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
headers), 413 for a body or image over its limit, 415 for another content type; a task whose package cannot be
loaded gets 503.

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
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Union

import litserve as ls
import torch
from fastapi import HTTPException
from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .header_deadline import DEFAULT_READ_TIMEOUT, HeaderDeadlineProtocol
from .images import MAX_IMAGE_PIXELS, ImageError, check_top_k, decode_image, eval_transform, top_k
from .task_admin import MAX_PACKAGE_BYTES, StatusBoard, TaskRoutes
from .task_store import TaskHandle, TaskStore, TaskUnavailable

log = logging.getLogger(__name__)

PREDICT_PATH = "/predict"
TASKS_PATH = "/tasks"
HEALTH_PATH = "/health"
UI_PATH = "/ui"
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
RAW_TYPES = ("image/", "application/octet-stream")
#: the environment variable LitServe reads its API key from (``litserve.server.LIT_SERVER_API_KEY``)
API_KEY_ENV = "LIT_SERVER_API_KEY"
API_KEY_HEADER = "X-API-Key"


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
        self.transforms: Dict[str, Any] = {}  # eval transform settings -> transform (tasks prepared alike share one)
        self.model.watch()  # the task folders' changes, seen within a poll
        if self.status_folder is not None:
            StatusBoard(self.status_folder).start_publishing(self.model)

    def transform(self, handle: TaskHandle) -> Any:
        info = handle.info
        key = json.dumps(info.eval_transform, sort_keys=True, default=str)
        if key not in self.transforms:
            self.transforms[key] = eval_transform(info, self.model)
        return self.transforms[key]

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
            return Sample(self.transform(handle)(image), handle, k)
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
    """Every HTTP route but ``open_paths`` needs the header ``X-API-Key: KEY`` (401 otherwise), so that routes
    LitServe does not guard (``/tasks``, the API docs, a demo page) are guarded too."""

    def __init__(
        self, app: ASGIApp, api_key: str, open_paths: Iterable[str] = (HEALTH_PATH,), open_prefixes: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.open_paths = set(open_paths)
        self.open_prefixes = tuple(open_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in self.open_paths or (self.open_prefixes and path.startswith(self.open_prefixes)):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(API_KEY_HEADER.lower().encode(), b"")
        if hmac.compare_digest(given, self.api_key):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _refuse(
            scope, receive, send, 401, f"missing or wrong {API_KEY_HEADER} header", {"WWW-Authenticate": API_KEY_HEADER}
        )


class RequestBodyMiddleware:
    """ASGI middleware for ``POST /predict``: refuses bodies over ``max_bytes`` (413), not received within
    ``read_timeout`` seconds (408) and malformed JSON (400, deep nesting included), and turns a raw image upload
    (``?task=NAME``) into the JSON body the API reads. Other routes pass through."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, read_timeout: float = DEFAULT_READ_TIMEOUT, path: str = PREDICT_PATH
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _refuse(
                scope, receive, send, 413, f"request body of {declared} bytes is over {self.max_bytes}"
            )
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
            if size > self.max_bytes:
                return await _refuse(scope, receive, send, 413, f"request body is over {self.max_bytes} bytes")
        body = b"".join(chunks)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type.startswith(RAW_TYPES):
            query = QueryParams(scope.get("query_string", b"").decode("latin-1"))
            payload: Dict[str, Any] = {"image": base64.b64encode(body).decode("ascii")}
            if "task" in query:
                payload["task"] = query["task"]
            if "top_k" in query:
                if not query["top_k"].isdigit():
                    return await _refuse(
                        scope, receive, send, 400, f"top_k={query['top_k']!r} must be a positive integer"
                    )
                payload["top_k"] = int(query["top_k"])
            body = json.dumps(payload).encode()
        elif content_type in ("application/json", ""):
            try:
                json.loads(body)
            except RecursionError:
                return await _refuse(scope, receive, send, 400, "malformed JSON body: nested too deeply")
            except ValueError as err:  # UnicodeDecodeError too
                return await _refuse(scope, receive, send, 400, f"malformed JSON body: {err}")
        else:
            return await _refuse(
                scope,
                receive,
                send,
                415,
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


class GracefulLitServer(ls.LitServer):
    """A LitServer whose shutdown answers the requests in flight: the uvicorn processes are stopped first (SIGTERM:
    uvicorn closes its socket and finishes its open requests within ``uvicorn_graceful_timeout``) while the
    inference workers still run; LitServe then stops the workers and its manager."""

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason: str = "normal") -> None:
        for worker in uvicorn_workers.values():
            if hasattr(worker, "terminate") and worker.is_alive():
                worker.terminate()
        for worker in uvicorn_workers.values():
            worker.join(timeout=self.uvicorn_graceful_timeout + 1)
            if worker.is_alive() and hasattr(worker, "kill"):
                log.warning("uvicorn process %s did not stop in time: killing it", worker.pid)
                worker.kill()
                worker.join(timeout=2)
        super()._perform_graceful_shutdown(manager, {}, shutdown_reason)


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
    """The LitServer: the API, the request-body middleware, the task routes (:func:`add_task_routes`), the API key
    on every route but ``/health`` (``api_key``), the API docs (only with ``docs``) and the demo page (``ui``,
    mounted at ``/ui``; it classifies through ``server_url``'s ``/predict``, and with a key Gradio's login page asks
    for it). ``status_folder``: where the inference worker publishes its store's state for the task routes (a
    temporary folder :func:`serve` makes); without it the routes read ``model`` itself (a server run in this
    process)."""
    api = MultiTaskAPI(model, default_top_k, max_batch_size, batch_timeout, max_image_pixels, status_folder)
    middlewares: List[Any] = [(RequestBodyMiddleware, {"max_bytes": max_request_bytes, "read_timeout": read_timeout})]
    if api_key:  # added last: the outermost, so that nothing answers before the key is checked
        open_ui = {"open_paths": (HEALTH_PATH, UI_PATH), "open_prefixes": (UI_PATH + "/",)} if ui else {}
        middlewares.append((ApiKeyMiddleware, {"api_key": api_key, **open_ui}))
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
    add_task_routes(server, TaskRoutes(model, board, bool(api_key), max_package_bytes))
    if ui:
        from .demo import mount_demo

        mount_demo(server.app, model, server_url + PREDICT_PATH, api_key=api_key, max_file_bytes=max_request_bytes)
    return server


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
    flight are answered, every process it started has ended when this returns. Warns when ``host`` is not a
    loopback address and no API key is set."""
    server_options["api_key"] = resolve_api_key(server_options.get("api_key"))
    warning = exposure_warning(host, server_options["api_key"])
    if warning and warn_exposure:
        warnings.warn(warning, stacklevel=2)
    if server_options.get("ui"):
        from .demo import local_url

        server_options.setdefault("server_url", local_url(host, port))
    status_folder = tempfile.mkdtemp(prefix="vpt-serve-")  # the worker's store state, for the task routes
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
    finally:
        _stop_forked_processes_with_this_one(serving=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(status_folder, ignore_errors=True)


def _stop_processes(processes: Iterable[Any], timeout: float = 5) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=timeout)
        if process.is_alive():
            process.kill()
