"""The task routes of ``vpt-serve`` over a :class:`~vpt_lightning.serving.task_store.TaskStore`: ``GET /tasks``
(paged, each task's state), ``GET /tasks/NAME``, and the admin routes ``PUT /tasks/NAME`` (a package upload) and
``DELETE /tasks/NAME``.

LitServe runs the inference worker in a process of its own (spawned; the store it uses, with the loaded tensors,
lives there) and answers HTTP in another (forked from the server's main process, with the main process's store:
the index and the backbone, no loaded tensor). So:

- the worker watches the folders (:meth:`TaskStore.watch`) and publishes what only it knows, the cache's figures,
  which tasks are resident or pinned and its index's stamps, to small files (:class:`StatusBoard`);
- the HTTP process lists the tasks from its own index (refreshed at most every ``poll_seconds`` when asked), with
  the worker's states;
- an admin route checks the upload in full as the store would serve it, writes it into the first task folder in
  one step (:meth:`TaskStore.put`, :meth:`TaskStore.remove`), and answers once the worker's index shows the
  change (the worker's watcher finds it within a poll).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..task_model import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE
from .package_io import stamp_of
from .task_store import TaskStore, UnknownTask, stamp_token

#: ``GET /tasks``: entries per page by default, and at most
PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
#: ``PUT /tasks/NAME``: larger uploads get 413 (``vpt-serve --max-package-bytes``, applied with the other body
#: limits by :class:`~vpt_lightning.serving.server.RequestBodyMiddleware`)
MAX_PACKAGE_BYTES = 64 * 2**20


class StatusBoard:
    """What the worker's store knows that the HTTP process shows: written by the worker (:meth:`publish`, two small
    JSON files in ``folder``: the cache's state and the index's stamps), read by the HTTP process (:meth:`read`)."""

    def __init__(self, folder: os.PathLike) -> None:
        self.folder = Path(folder)
        self._read: Dict[str, Any] = {}

    def _write(self, name: str, values: Dict[str, Any]) -> None:
        tmp = self.folder / f".{name}.tmp"
        tmp.write_text(json.dumps(values))
        os.replace(tmp, self.folder / name)  # readers see the old file or the new one (no fsync: it is ephemeral)

    def publish(self, store: TaskStore) -> None:
        """Write what changed since the last call (the index, the cache), if anything."""
        generation, changes = store.generation, store.cache.changes
        if (generation, changes) == self._read.get("published"):
            return
        snapshot = store.snapshot()
        index = snapshot.pop("index")
        if generation != self._read.get("generation"):
            self._write("index.json", index)
            self._read["generation"] = generation
        self._write("cache.json", snapshot)
        self._read["published"] = (generation, changes)

    def start_publishing(self, store: TaskStore, interval: float = 0.5) -> threading.Thread:
        """Publish every ``interval`` seconds, in a daemon thread of the worker."""

        def run() -> None:
            while True:
                try:
                    self.publish(store)
                except OSError:  # the server's temporary folder removed at shutdown
                    return
                time.sleep(interval)

        thread = threading.Thread(target=run, daemon=True, name="task-store-status")
        thread.start()
        return thread

    def read(self, name: str) -> Dict[str, Any]:
        """The worker's last ``cache`` or ``index`` (empty before it published)."""
        try:
            return json.loads((self.folder / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}


class TaskRoutes:
    """The routes' work, for the HTTP process: ``store`` (its index), the worker's ``board`` (``None``: ``store``
    serves in this very process) and whether admin routes are allowed (``admin``: an API key guards the server).
    An upload's body reaches :meth:`put_task` through the server's body middleware (its size cap, read timeout and
    the budget of bodies held at once), which a refused admin route never reads."""

    def __init__(self, store: TaskStore, board: Optional[StatusBoard], admin: bool) -> None:
        self.store = store
        self.board = board
        self.admin = admin
        self._refreshed = time.monotonic()
        self._lock = threading.Lock()

    def _fresh(self) -> None:
        """Refresh this process's index if it is older than a poll."""
        with self._lock:
            if time.monotonic() - self._refreshed >= self.store.poll_seconds:
                self.store.refresh()
                self._refreshed = time.monotonic()

    def _state(self, part: str) -> Dict[str, Any]:
        """The serving store's ``cache`` state or ``index`` stamps (the worker's, else this store's own)."""
        if self.board is not None:
            return self.board.read(part)
        snapshot = self.store.snapshot()
        return snapshot["index"] if part == "index" else snapshot

    def _task(self, name: str, cache: Dict[str, Any]) -> Dict[str, Any]:
        entry = self.store.entry(name)
        resident, pinned = cache.get("resident", {}), set(cache.get("pinned", []))
        if entry.in_memory or name in resident:
            state = "pinned" if name in pinned or entry.in_memory else "resident"
        else:
            state = "refused" if name in cache.get("problems", {}) else "indexed"
        out = {**entry.info.to_dict(), "state": state}
        version = resident.get(name) or entry.version
        if version:
            out["version"] = version
        if name in cache.get("problems", {}):
            out["error"] = cache["problems"][name]
        return out

    def list_tasks(self, offset: int = 0, limit: int = PAGE_SIZE) -> Dict[str, Any]:
        """A page of the served tasks (``offset``, ``limit`` <= 1000), each with its classes and state
        (``pinned``, ``resident``, ``indexed``, ``refused``), and the cache's figures."""
        if offset < 0 or not 1 <= limit <= MAX_PAGE_SIZE:
            return JSONResponse(
                {"detail": f"offset={offset}, limit={limit}: offset >= 0 and 1 <= limit <= {MAX_PAGE_SIZE}"}, 400
            )
        self._fresh()
        cache = self._state("cache")
        names = self.store.task_names
        tasks = []
        for name in names[offset : offset + limit]:
            try:
                tasks.append(self._task(name, cache))
            except UnknownTask:  # removed meanwhile
                continue
        problems = {k: v for k, v in cache.get("problems", self.store.problems).items() if k not in self.store}
        return {
            "total": len(names),
            "offset": offset,
            "limit": limit,
            "tasks": tasks,
            "cache": cache.get("cache", self.store.cache.stats()),
            "problems": problems,
        }

    def get_task(self, name: str) -> Any:
        self._fresh()
        try:
            return self._task(name, self._state("cache"))
        except UnknownTask as err:
            return JSONResponse({"detail": str(err)}, 404)

    async def put_task(self, name: str, request: Request) -> Any:
        """``PUT /tasks/NAME``: a package as multipart form files ``config.json``, ``model.safetensors`` (and
        optionally ``README.md``): checked, written into the first task folder, answered once served."""
        refused = self._refuse_admin()
        if refused is not None:
            return refused
        files = await self._upload(request)
        if isinstance(files, JSONResponse):
            return files
        from starlette.concurrency import run_in_threadpool

        existed = (self.store.folders[0] / name).exists()
        try:
            version = await run_in_threadpool(self.store.put, name, files)
        except (ValueError, OSError) as err:
            return JSONResponse({"detail": str(err)}, 400)
        token = stamp_token(stamp_of(os.stat(self.store.folders[0] / name)))
        served = await run_in_threadpool(self._wait, lambda index: index.get(name) == token)
        return JSONResponse({"name": name, "version": version, "served": served}, 200 if existed else 201)

    async def delete_task(self, name: str) -> Any:
        """``DELETE /tasks/NAME``: the task's package removed from the first task folder."""
        refused = self._refuse_admin()
        if refused is not None:
            return refused
        from starlette.concurrency import run_in_threadpool

        try:
            await run_in_threadpool(self.store.remove, name)
        except UnknownTask as err:
            return JSONResponse({"detail": str(err)}, 404)
        except (ValueError, OSError) as err:
            return JSONResponse({"detail": str(err)}, 400)
        served = await run_in_threadpool(self._wait, lambda index: name not in index)
        return {"name": name, "removed": True, "served": served}

    def _refuse_admin(self) -> Optional[JSONResponse]:
        if not self.admin:
            return JSONResponse(
                {"detail": "adding or removing tasks needs the server to require an API key (--api-key)"}, 403
            )
        if not self.store.folders:
            return JSONResponse(
                {"detail": "this server watches no task folder: start it with --tasks DIR to add or remove tasks"},
                409,
            )
        return None

    async def _upload(self, request: Request) -> Any:
        """The uploaded files (the body as the body middleware read it, within its limits)."""
        allowed = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
        try:
            form = await request.form(max_files=len(allowed), max_fields=0)
        except Exception as err:  # starlette's multipart errors (HTTPException 400, MultiPartException)
            detail = getattr(err, "detail", None) or str(err)
            return JSONResponse(
                {"detail": f"not a package upload (multipart form files {list(allowed)}): {detail}"}, 400
            )
        files = {}
        for key, value in form.multi_items():
            if key not in allowed or isinstance(value, str):
                return JSONResponse(
                    {"detail": f"form field {key!r}: a package upload holds the files {list(allowed)}"}, 400
                )
            files[key] = await value.read()
        if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
            return JSONResponse({"detail": f"a package upload needs the files {CONFIG_FILE} and {WEIGHTS_FILE}"}, 400)
        return files

    def _wait(self, done: Callable[[Dict[str, Any]], bool], timeout: Optional[float] = None) -> bool:
        """Wait until the worker's index satisfies ``done`` (its watcher finds a change within a poll)."""
        deadline = time.monotonic() + (timeout if timeout is not None else 4 * self.store.poll_seconds + 5)
        while time.monotonic() < deadline:
            if self.board is None:  # the store serving in this process: it looks now
                self.store.refresh(settle=False)
            if done(self._state("index")):
                return True
            time.sleep(0.05)
        return False
