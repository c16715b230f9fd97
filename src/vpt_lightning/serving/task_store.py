"""``TaskStore``: thousands of tasks on one frozen backbone, loaded on demand and changed while serving.

What is held where:

- the shared backbone: one timm model, built once (the operator's ``backbone`` pin, else the first task's own
  config, as a single task is loaded);
- the index (:mod:`~vpt_lightning.serving.task_index`): every task of the watched folders, read from its
  ``config.json`` only (name, spec, classes, the folder's stamp), plus tasks given in memory (:meth:`TaskStore.add`);
- the layouts (:class:`~vpt_lightning.serving.task_tensors.TaskLayout`): one per task *shape* (method, prompt
  config, head, classes), what such a package holds and where each tensor goes in the pass;
- the cache (:mod:`~vpt_lightning.serving.task_cache`): the tensors of the tasks in use, bounded in bytes.

When tasks load and leave: a task's ``model.safetensors`` is read on its first use (:meth:`TaskStore.open`), checked
as loading one package checks it (:mod:`~vpt_lightning.serving.package_io`: the trained keys and shapes, finite
values, number dtypes) and kept
in the cache until it is the least recently used and nothing uses it; pinned tasks (``pins``) stay. :meth:`refresh`
(every ``poll_seconds`` once :meth:`watch` runs) finds the tasks added, replaced or removed in the folders: a new
version replaces the old in the index at once (loaded at once if the old one was in memory), the old one leaves the
cache when the last batch using it ends. A request holds the version it opened, so it is answered by it whatever
changes meanwhile.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import heads
from ..backbones import BackboneConfig, PromptedBackbone, create_backbone, prompted_backbone
from ..backbones.identity import identity_differences
from ..backbones.pin import backbone_pin, own_backbone
from ..sharing.checkpoint import TaskCheckpoint
from ..sharing.task_sources import read_task, record_of_checkpoint
from ..sharing.trust import check_finite, check_tensor_shapes
from ..task_model import TaskRecord, TaskSpec, check_shares_backbone
from ..task_model import check_package as check_package_files
from .package_io import (
    PackageReader,
    content_version,
    install_package,
    placed,
    remove_package,
    remove_stale_staging,
    stage_package,
    tensors_version,
)
from .shared_weights import weight_sharing_copy
from .task_cache import Key, TaskCache
from .task_index import Found, ServedTask, TaskEntry, check_task_name, default_task_name, read_entry, scan_folders
from .task_tensors import TaskLayout, TaskTensors, classify, shape_signature

log = logging.getLogger(__name__)

#: layouts kept (one per task shape); a shape past this many is rebuilt when used again
MAX_LAYOUTS = 1024
#: reads of a package whose folder is swapped for a new version (and deleted) while it is read
LOAD_ATTEMPTS = 3
#: every package folder's stamp is read at least this often (files changed inside it); a folder swapped, added or
#: removed is seen at every poll (listing the folders gives each entry's inode)
SWEEP_SECONDS = 1.0


class UnknownTask(ValueError):
    """A task name the store does not serve."""


class TaskUnavailable(RuntimeError):
    """A task whose package could not be loaded (its error says why); served again once its folder changes."""


@dataclass(frozen=True)
class TaskHandle:
    """A task version opened for a batch: its entry and tensors, held until :meth:`TaskStore.release`."""

    entry: TaskEntry
    tensors: TaskTensors
    key: Optional[Key]  # held in the cache (else: loaded for this batch only)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def version(self) -> str:
        return self.tensors.version

    @property
    def info(self) -> ServedTask:
        return self.entry.info


def stamp_token(stamp: Any) -> str:
    """A stamp as a short string (the same in every process that stats the same folder)."""
    return "-".join(format(v, "x") if isinstance(v, int) else str(v) for v in stamp)


class TaskStore(nn.Module):
    """Tasks (package folders in watched ``folders``, and tasks added in memory) on one shared frozen backbone,
    their tensors loaded on first use into a cache of ``cache_bytes`` (``None``: unbounded), ``pins`` always held.

    ``forward(images, tasks)`` classifies a batch whose row ``b`` belongs to task ``tasks[b]`` (names, or a tensor
    of positions in :attr:`task_names`) in one pass of the backbone (see
    :func:`~vpt_lightning.serving.task_tensors.classify`). A server opens each request's task with :meth:`open`
    (the version it is answered by), runs :meth:`classify` on a batch of handles and :meth:`release`\\ s them.

    Args:
        backbone: the shared backbone: a :class:`~vpt_lightning.backbones.BackboneConfig` or its mapping, or a pin
            (``--backbone``: a packaged config name, a ``.yaml``/``.json``, a weights file; see
            :func:`~vpt_lightning.backbones.pin.backbone_pin`); ``None``: the first task's (first folder, first name).
        folders: watched folders of task packages (one per sub-folder; a name in several: the first folder's).
            New packages are written into the first one (:meth:`put`).
        cache_bytes: the most bytes of task tensors held (least recently used out first; tasks in use and pinned
            ones never); ``None``: no bound.
        pins: task names always held in memory.
        poll_seconds: how often :meth:`watch` looks for changes in the folders.
        allow_download: without ``backbone``, the first task's own entry may be timm's hub weights it names
            (:func:`~vpt_lightning.backbones.pin.own_backbone`; ``--allow-download``).
    """

    def __init__(
        self,
        backbone: Any = None,
        folders: Sequence[Union[str, os.PathLike]] = (),
        cache_bytes: Optional[int] = None,
        pins: Sequence[str] = (),
        poll_seconds: float = 0.5,
        allow_download: bool = False,
    ) -> None:
        super().__init__()
        self.allow_download = allow_download
        self.folders = [Path(f).expanduser() for f in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise FileNotFoundError(f"task folder {str(folder)!r} is not a folder")
            for left in remove_stale_staging(folder):
                log.info("task store: removed %s, left by a put or delete that did not finish", left)
        self.poll_seconds = float(poll_seconds)
        self._setup_state(TaskCache(cache_bytes))
        self._entries: Dict[str, TaskEntry] = {}
        self._names: Optional[List[str]] = None
        self.problems: Dict[str, str] = {}  # name -> why its package is not served
        self._refused: Dict[str, Tuple[Any, str]] = {}  # name -> (stamp, error): a package that failed to load
        self._seen: Dict[str, Found] = {}  # the last scan
        self._memory_counter = 0
        self.generation = 0  # counts the index's changes
        self._polls = 0
        start = time.perf_counter()
        config = self._backbone_config(backbone)
        model, self.identity = create_backbone(config)
        self.backbone_config = config
        self.backbone: PromptedBackbone = prompted_backbone(model, None)  # the shared model, without prompts
        self.eval()
        self.timings = {"backbone_s": time.perf_counter() - start}
        start = time.perf_counter()
        self.refresh(settle=False)
        self.timings["index_s"] = time.perf_counter() - start
        self.pin(*pins)

    @classmethod
    def from_sources(
        cls,
        sources: Union[Sequence[Union[str, os.PathLike]], Mapping[str, Union[str, os.PathLike]]] = (),
        backbone: Any = None,
        allow_download: bool = False,
        **store_options: Any,
    ) -> "TaskStore":
        """A store of tasks held in memory (a list of sources, or names -> sources: package folders, Hub repos
        ``hf://OWNER/NAME``, ``.ckpt`` files, run folders), and of the task ``folders`` in ``store_options`` (see
        the class). Every source is read and checked before the backbone is built, which is the pinned ``backbone``
        (:func:`~vpt_lightning.backbones.pin.backbone_pin`: a config, a ``conf/backbone`` name, a YAML or weights
        file), else the first source's own entry as :func:`~vpt_lightning.backbones.pin.own_backbone` allows (its
        seeded random init or the shipped quickstart backbone; timm's hub weights only with ``allow_download``),
        else (no source) the folders' first package's."""
        items = list(sources.items()) if isinstance(sources, Mapping) else [(None, s) for s in sources]
        read = [(name, read_task(source)) for name, source in items]
        if read:
            first = read[0][1]
            if backbone is not None:
                backbone = backbone_pin(backbone, first.spec.backbone)
            else:
                backbone = own_backbone(first.spec.backbone, repr(str(first.origin)), allow_download)
        store = cls(backbone, allow_download=allow_download, **store_options)
        for name, record in read:
            store.add(record, name)
        return store

    def _setup_state(self, cache: TaskCache) -> None:
        """What a store holds that is not pickled (locks, the watcher, the layouts) and its cache, empty."""
        self.cache = cache
        self._lock = threading.RLock()  # the index and the cache
        self._pass_lock = threading.RLock()  # the shared model: one pass (its hooks) or copy at a time
        self._layouts: "OrderedDict[str, TaskLayout]" = OrderedDict()
        self._identities: Dict[str, List[str]] = {}
        self._watcher: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def __getstate__(self) -> Dict[str, Any]:
        """Pickled (to a server's worker process) without locks, watcher, layouts or loaded tensors; with the
        modules that registered heads here (the operator's ``--import``), imported again where it is unpickled, as
        a pickled head would have had its class's module imported."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_pass_lock", "_watcher", "_stop")}
        cache = TaskCache(self.cache.budget)
        cache.pinned = set(self.cache.pinned)
        state["cache"], state["_layouts"], state["_identities"] = cache, OrderedDict(), {}
        modules = {heads.head_class(name).__module__ for name in heads.registered_heads()}
        state["_head_modules"] = sorted(modules - {"__main__", "__mp_main__"})
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        for module in state.pop("_head_modules", ()):
            importlib.import_module(module)
        super().__setstate__(state)
        cache = self.cache
        self._setup_state(cache)

    def _backbone_config(self, backbone: Any) -> BackboneConfig:
        if isinstance(backbone, (BackboneConfig, Mapping)):
            return BackboneConfig.parse(backbone)
        first = self._first_package()
        if backbone is not None:
            return backbone_pin(backbone, first.spec.backbone if first else None)
        if first is None:
            raise ValueError(
                f"no task package in {[str(f) for f in self.folders]} to take the backbone from; give the backbone "
                "(--backbone NAME_OR_FILE, backbone= in Python)"
            )
        return own_backbone(first.spec.backbone, first.config_origin, self.allow_download)

    def _first_package(self) -> Optional[TaskEntry]:
        """The first package of the folders (by folder, then name) that loading one would accept before building
        its backbone (:func:`~vpt_lightning.task_model.check_package`: its config values only, its tensors' sizes
        within the caps): whose backbone a store takes when none is given."""
        found, _ = scan_folders(self.folders)
        for name, where in sorted(found.items(), key=lambda item: (item[1].rank, item[0])):
            try:
                check_package_files(where.path)
                with PackageReader(where.path) as reader:
                    return read_entry(name, where, reader.config())[0]
            except (OSError, ValueError):
                continue
        return None

    # ---- the index ---------------------------------------------------------------------------------------------
    def _index_changed(self) -> None:
        self._names = None
        self.generation += 1

    @property
    def task_names(self) -> List[str]:
        """The served tasks: those added in memory (in order), then the folders' (by folder, then name)."""
        with self._lock:
            if self._names is None:
                entries = self._entries.values()
                memory = [e.name for e in entries if e.in_memory]
                folder = sorted((e for e in entries if not e.in_memory), key=lambda e: (e.rank, e.name))
                self._names = memory + [e.name for e in folder]
            return list(self._names)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> TaskEntry:
        """The current entry of task ``name``; :class:`UnknownTask` if there is none."""
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownTask(self.unknown_message([name]))
        return entry

    def unknown_message(self, names: Sequence[str]) -> str:
        count = len(self._entries)
        listed = self.task_names if count <= 20 else f"{count} tasks (GET /tasks lists them)"
        return f"unknown task(s) {sorted(set(names))}; the tasks are {listed}"

    @property
    def infos(self) -> Dict[str, ServedTask]:
        """Each task's name, classes, method, source and eval transform, by name (built on each call)."""
        with self._lock:
            return {name: self._entries[name].info for name in self.task_names}

    def _check_task(self, spec: TaskSpec, identity: Optional[Mapping[str, Any]], origin: str) -> None:
        """Refuse a task that cannot share this backbone: a method that trains backbone weights, a task without
        or with another backbone identity (differences kept per identity: thousands of tasks share a few)."""
        check_shares_backbone(spec, origin)
        if identity is None:
            raise ValueError(f"{origin} records no backbone identity, so it cannot be checked against the backbone")
        key = repr(sorted(identity.items(), key=lambda item: item[0])) if isinstance(identity, Mapping) else "?"
        differences = self._identities.get(key)
        if differences is None:
            differences = identity_differences(identity, self.identity) if isinstance(identity, Mapping) else ["?"]
            self._identities[key] = differences
        if differences:
            raise ValueError(
                f"{origin} was trained on another backbone than the shared one ({self.backbone_config.name}, "
                f"weights {self.identity.get('weights')}); differences: {'; '.join(differences)}"
            )

    def _read_package_entry(self, name: str, where: Found, config: Optional[bytes] = None) -> TaskEntry:
        """The entry of the package ``where`` (its ``config.json`` read now unless given), checked to fit."""
        if config is None:
            with PackageReader(where.path) as reader:
                config = reader.config()
        entry, identity = read_entry(name, where, config)
        self._check_task(entry.spec, identity, entry.config_origin)
        return entry

    def refresh(self, settle: bool = True) -> Dict[str, List[str]]:
        """Look for tasks added, replaced or removed in the folders and update the index; returns the names of
        each. A package folder swapped or added in one step is read at once. With ``settle`` (a watcher's poll),
        the folders' stamps are read in shares, each at least every :data:`SWEEP_SECONDS`; a package changed in
        place (files renamed into its folder) is read once it stayed unchanged for one more refresh, and one gone
        is removed once it stayed gone for one more refresh (a swap that renames the old folder away before the
        new one in)."""
        changes: Dict[str, List[str]] = {"added": [], "changed": [], "removed": []}
        if not self.folders:
            return changes
        self._polls += 1
        parts = max(1, round(SWEEP_SECONDS / self.poll_seconds)) if settle else 1
        sweep = self._polls % parts

        def look(name: str) -> bool:  # this poll's share of the folders whose stamps are read
            return parts == 1 or zlib.crc32(name.encode()) % parts == sweep

        found, problems = scan_folders(self.folders, self._seen if settle else None, look)
        with self._lock:
            current = {name: e for name, e in self._entries.items() if not e.in_memory}
            refused = dict(self._refused)
        to_read: List[Tuple[str, Found]] = []
        for name, where in found.items():
            entry = current.get(name)
            if entry is not None and entry.stamp == where.stamp and str(entry.origin) == where.path:
                continue
            if name in refused and refused[name][0] == where.stamp:
                continue
            previous = self._seen.get(name)
            in_place = entry is not None and entry.stamp[0] == where.stamp[0] and str(entry.origin) == where.path
            if settle and in_place and (previous is None or previous.stamp != where.stamp):
                continue  # changed in place: read once it stays as it is
            to_read.append((name, where))
        read: Dict[str, TaskEntry] = {}
        failed: Dict[str, str] = {}
        for name, where in to_read:
            try:
                read[name] = self._read_package_entry(name, where)
            except (OSError, ValueError) as err:
                previous = self._seen.get(name)
                if not settle or (previous is not None and previous.stamp == where.stamp):
                    failed[name] = str(err)  # unchanged since the last look: not a write in progress
        gone = [name for name in current if name not in found and (not settle or name not in self._seen)]
        reload: List[TaskEntry] = []
        with self._lock:
            for name, entry in read.items():
                if name in self._entries and self._entries[name].in_memory:
                    problems[name] = f"{str(entry.origin)!r} is shadowed by the task of that name added in memory"
                    continue
                old = self._entries.get(name)
                if old is not current.get(name):  # a request re-read it meanwhile, as it is now: keep that
                    continue
                changes["changed" if old is not None else "added"].append(name)
                if old is not None and (self._held(old) or name in self.cache.pinned):
                    reload.append(entry)
                self._entries[name] = entry
                self.cache.discard_name(name)
                self._refused.pop(name, None)
            for name, error in failed.items():  # an entry's old version stays in memory if it is
                self._refused[name] = (found[name].stamp, error)
            for name in gone:
                if name in self._entries and not self._entries[name].in_memory:
                    self._entries.pop(name)
                    self.cache.discard_name(name)
                    changes["removed"].append(name)
                self._refused.pop(name, None)
            for name in [n for n in self._refused if n not in found and n not in self._entries]:
                self._refused.pop(name)  # a refused package that is gone
            self.problems = {**problems, **{name: error for name, (_, error) in self._refused.items()}}
            if any(changes.values()):
                self._index_changed()
            self._seen = found
        for entry in reload:  # a task that was in memory stays in memory across a replace
            try:
                self.release([self.open(entry.name)])
            except (UnknownTask, TaskUnavailable) as err:
                log.warning("task %s: the new version could not be loaded: %s", entry.name, err)
        for kind, names in changes.items():
            if names:
                log.info("task store: %d %s: %s", len(names), kind, ", ".join(sorted(names)[:10]))
        return changes

    def watch(self, poll_seconds: Optional[float] = None) -> None:
        """Refresh the index every ``poll_seconds`` (default: the store's) in a background thread, until
        :meth:`close`."""
        if self._watcher is not None or not self.folders:
            return
        if poll_seconds is not None:
            self.poll_seconds = float(poll_seconds)
        interval = self.poll_seconds
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                except Exception:  # a watcher that dies would leave the index stale for ever: log and go on
                    log.exception("task store: refreshing the index failed")

        self._watcher = threading.Thread(target=run, daemon=True, name="task-store-watcher")
        self._watcher.start()

    def close(self) -> None:
        """Stop the watcher thread (if any)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
            self._watcher = None

    # ---- tasks in memory ---------------------------------------------------------------------------------------
    def add(self, source: Union[TaskRecord, TaskCheckpoint, str, os.PathLike], name: Optional[str] = None) -> str:
        """Add a task held in memory (a package, Hub repo id, ``.ckpt``, run folder, or one already read); returns
        its name (``name``, else the task's ``task_name``, else its source's name). It is never evicted."""
        if isinstance(source, TaskCheckpoint):
            source = record_of_checkpoint(source)
        record = source if isinstance(source, TaskRecord) else read_task(source)
        path, spec = Path(record.origin), record.spec
        origin = repr(str(path))
        name = name or spec.task_name or default_task_name(path)
        check_task_name(name, repr(str(path)))
        with self._lock:
            if name in self._entries:
                raise ValueError(
                    f"task name {name!r} of {str(path)!r} is already taken by {str(self._entries[name].origin)!r}; "
                    "name the tasks explicitly (NAME=PATH on the command line, a mapping in Python)"
                )
        self._check_task(spec, record.identity, origin)
        layout = self.layout(spec, origin)
        check_tensor_shapes({k: tuple(v.shape) for k, v in record.state_dict.items()}, layout.expected, origin)
        check_finite(record.state_dict, origin)
        state = placed(record.state_dict, str(path), torch.device("cpu"), torch.float32)
        self._memory_counter += 1
        entry = TaskEntry(
            name,
            spec,
            path,
            ("memory", self._memory_counter),
            record=TaskRecord(path, spec, state, record.identity, dict(record.info)),
            version=tensors_version(state),
        )
        with self._lock:
            self._entries[name] = entry
            self._index_changed()
            self.cache.pinned.add(name)
        self.release([self.open(name)])  # built now: an error shows here, not at the first request
        return name

    # ---- loading -----------------------------------------------------------------------------------------------
    def layout(self, spec: TaskSpec, origin: str) -> TaskLayout:
        """The :class:`TaskLayout` of ``spec``'s shape (built on first use, then kept; an error names ``origin``,
        the task's file)."""
        signature = shape_signature(spec)
        with self._lock:
            layout = self._layouts.get(signature)
            if layout is not None:
                self._layouts.move_to_end(signature)
                return layout
        with self._pass_lock:  # a copy of the shared model must not catch a running pass's hooks
            layout = TaskLayout(spec, self.backbone, self.identity, copy=self._shared_copy, origin=origin)
        with self._lock:
            self._layouts[signature] = layout
            while len(self._layouts) > MAX_LAYOUTS:
                self._layouts.popitem(last=False)
        return layout

    def _shared_copy(self) -> nn.Module:
        with self._pass_lock:
            return weight_sharing_copy(self.backbone.model)

    def _placement(self) -> Tuple[torch.device, torch.dtype]:
        first = next(self.backbone.parameters())
        return first.device, first.dtype

    def _load(self, entry: TaskEntry) -> Tuple[TaskEntry, TaskTensors]:
        """Read ``entry``'s tensors (the index entry as read now: a package changed meanwhile is re-read) and
        bind them to their layout."""
        device, dtype = self._placement()
        if entry.in_memory:
            assert entry.record is not None
            layout = self.layout(entry.spec, entry.config_origin)
            state = placed(entry.record.state_dict, str(entry.origin), device, dtype)
            return entry, layout.bind(entry.name, entry.version, entry.spec, state, entry.origin)
        for attempt in range(LOAD_ATTEMPTS):
            try:
                with PackageReader(entry.origin) as reader:
                    config = reader.config()
                    changed = hashlib.sha256(config).digest() != entry.config
                    if reader.stamp != entry.stamp or changed:  # changed since indexed: read it now
                        where = Found(entry.rank, str(entry.origin), reader.stamp)
                        entry = self._read_package_entry(entry.name, where, config)
                    layout = self.layout(entry.spec, entry.config_origin)
                    tensors, weights = reader.tensors(layout.expected, device, dtype)
                break
            except FileNotFoundError:  # the version opened was swapped out and deleted meanwhile: read the new one
                if attempt == LOAD_ATTEMPTS - 1:
                    raise
        version = content_version(config, weights)
        return entry, layout.bind(entry.name, version, entry.spec, tensors, entry.origin)

    def _held(self, entry: TaskEntry) -> bool:
        return (entry.name, entry.stamp) in self.cache

    def open(self, name: str) -> TaskHandle:
        """Task ``name``'s current version, loaded if it is not in memory, held until :meth:`release` (the version
        a request is answered by). :class:`UnknownTask` for a name not served; :class:`TaskUnavailable` for a
        package that cannot be loaded (its error)."""
        with self._lock:
            entry = self.entry(name)
            key = (name, entry.stamp)
            tensors = self.cache.get(key)
            if tensors is None:
                if name in self._refused:
                    raise TaskUnavailable(f"task {name!r} cannot be loaded: {self._refused[name][1]}")
                try:
                    loaded, tensors = self._load(entry)
                except OSError as err:  # gone or unreadable now: this request fails, the watcher decides the rest
                    raise TaskUnavailable(f"task {name!r} cannot be loaded: {err}") from None
                except ValueError as err:  # a bad package: refused until its folder changes
                    self._refused[name] = (entry.stamp, str(err))
                    self.problems[name] = str(err)
                    self.generation += 1
                    raise TaskUnavailable(f"task {name!r} cannot be loaded: {err}") from None
                if loaded.stamp != entry.stamp:  # changed on disk since indexed: the index follows
                    self.cache.discard_name(name)
                    self._entries[name] = entry = loaded
                    self._index_changed()
                key = (name, entry.stamp)
                if not self.cache.put(key, tensors, tensors.nbytes):
                    return TaskHandle(entry, tensors, None)  # no room beside the tasks in use: this batch only
            self.cache.acquire(key)
            return TaskHandle(entry, tensors, key)

    def release(self, handles: Iterable[TaskHandle]) -> None:
        """Give back what :meth:`open` held."""
        with self._lock:
            for handle in handles:
                if handle.key is not None:
                    self.cache.release(handle.key)

    def pin(self, *names: str) -> None:
        """Keep tasks ``names`` in memory (loaded now); an unknown name, or pins over the cache's budget, fail."""
        unknown = [n for n in names if n not in self._entries]
        if unknown:
            raise UnknownTask(f"cannot pin {unknown}: " + self.unknown_message(unknown))
        with self._lock:
            self.cache.pinned.update(names)
        for name in names:
            handle = self.open(name)
            self.release([handle])
            if handle.key is None:
                raise ValueError(
                    f"the pinned tasks do not fit the cache of {self.cache.budget} bytes (task {name!r} needs "
                    f"{handle.tensors.nbytes} more); raise --cache-bytes or pin fewer tasks"
                )

    # ---- classifying -------------------------------------------------------------------------------------------
    def classify(self, images: torch.Tensor, handles: Sequence[TaskHandle]) -> torch.Tensor:
        """Logits ``(B, C_max)`` of ``images`` whose row ``b`` belongs to ``handles[b]`` (its task's logits in the
        first ``C`` columns, ``-inf`` after them)."""
        position: Dict[int, int] = {}
        tasks: List[TaskTensors] = []
        index = []
        for handle in handles:
            slot = position.setdefault(id(handle.tensors), len(tasks))
            if slot == len(tasks):
                tasks.append(handle.tensors)
            index.append(slot)
        with self._pass_lock:
            return classify(self.backbone, tasks, images, torch.tensor(index, dtype=torch.long))

    def forward(self, images: torch.Tensor, tasks: Union[torch.Tensor, Sequence[str]]) -> torch.Tensor:
        """Logits ``(B, C_max)`` of ``images``, row ``b`` by task ``tasks[b]`` (a name, or a position in
        :attr:`task_names`); ``-inf`` past a task's classes."""
        if isinstance(tasks, torch.Tensor):
            names = self.task_names
            tasks = [names[i] for i in tasks.tolist()]
        opened: Dict[str, TaskHandle] = {}
        try:
            for name in tasks:
                if name not in opened:
                    opened[name] = self.open(name)
            return self.classify(images, [opened[name] for name in tasks])
        finally:
            self.release(opened.values())

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Moving or casting the store (``.to``, ``.half()``...) moves the shared backbone; tasks are loaded again
        on the new device and dtype."""
        super()._apply(fn, recurse)
        if hasattr(self, "cache"):
            with self._lock:
                pinned, budget = set(self.cache.pinned), self.cache.budget
                self.cache = TaskCache(budget)
                self.cache.pinned = pinned
            for name in sorted(pinned & set(self._entries)):
                self.release([self.open(name)])
        return self

    # ---- what is held ------------------------------------------------------------------------------------------
    def state_of(self, name: str) -> str:
        """``pinned``, ``resident`` (its tensors in memory), ``indexed`` (on disk) or ``refused``."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return "refused" if name in self.problems else "unknown"
            if name in self.cache.pinned and self._held(entry):
                return "pinned"
            if self._held(entry):
                return "resident"
            return "refused" if name in self._refused else "indexed"

    def snapshot(self) -> Dict[str, Any]:
        """What a server's other processes need of this store's state: the cache's figures, the resident tasks
        (name -> version), the pinned ones, each task's stamp and the problems."""
        with self._lock:
            resident = {}
            for (name, stamp), tensors in self.cache.items():
                entry = self._entries.get(name)
                if entry is not None and entry.stamp == stamp:
                    resident[name] = tensors.version
            return {
                "cache": self.cache.stats(),
                "resident": resident,
                "pinned": sorted(self.cache.pinned),
                "index": {name: stamp_token(e.stamp) for name, e in self._entries.items()},
                "problems": dict(self.problems),
            }

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes of the shared backbone and of each task in memory (its tensors: prompts, head, LoRA or adapter
        tensors...)."""
        shared = sum(t.numel() * t.element_size() for t in self.backbone.model.state_dict().values())
        with self._lock:
            tasks = {f"task:{name}": self.cache.nbytes((name, stamp)) for name, stamp in self.cache.keys()}
        return {"backbone": shared, **tasks}

    # ---- changing the folders ----------------------------------------------------------------------------------
    def check_package(self, folder: Union[str, os.PathLike], name: str = "task") -> Tuple[TaskEntry, str]:
        """Check a package folder fully as this store would serve it (config, backbone identity, every tensor);
        returns its entry and version. Nothing is kept."""
        folder = Path(folder)
        with PackageReader(folder) as reader:
            config = reader.config()
            entry = self._read_package_entry(name, Found(0, str(folder), reader.stamp), config)
            layout = self.layout(entry.spec, entry.config_origin)
            tensors, weights = reader.tensors(layout.expected, torch.device("cpu"), torch.float32)
        layout.bind(name, "", entry.spec, tensors, folder)
        return entry, content_version(config, weights)

    def put(self, name: str, files: Mapping[str, bytes]) -> str:
        """Add or replace task ``name`` in the first folder with a package's files (``config.json``,
        ``model.safetensors``, optionally ``README.md``): checked in full, then swapped into place in one step
        (:mod:`~vpt_lightning.serving.package_io`). Returns its version."""
        target = self._writable(name)
        staged = stage_package(self.folders[0], name, files)
        try:
            _, version = self.check_package(staged, name)
            install_package(staged, target)
        finally:
            if staged.exists():
                import shutil

                shutil.rmtree(staged, ignore_errors=True)
        return version

    def remove(self, name: str) -> None:
        """Remove task ``name``'s package from the first folder."""
        target = self._writable(name)
        if not target.exists():
            raise UnknownTask(f"task {name!r} has no package in {str(self.folders[0])!r}")
        remove_package(target)

    def _writable(self, name: str) -> Path:
        if not self.folders:
            raise ValueError("this store watches no folder: start it with task folders (--tasks DIR) to add tasks")
        check_task_name(name)
        with self._lock:
            entry = self._entries.get(name)
        if entry is not None and entry.in_memory:
            raise ValueError(f"task {name!r} was given at start ({str(entry.origin)!r}); it cannot be changed here")
        return self.folders[0] / name
