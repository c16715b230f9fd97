"""Which tasks a store serves: task package folders found in watched folders (from their ``config.json`` only), and
tasks given in memory.

A watched folder holds one package per sub-folder, named by the sub-folder (``tasks/cifar100/config.json`` is the
task ``cifar100``), or Hugging Face Hub cache repos (``models--OWNER--NAME``, whose ``refs/main`` names the snapshot
served; the task is ``NAME``). Hidden entries (``.NAME.new-XXXX`` while a package is written) are skipped.
:func:`scan_folders` lists them with a stamp each (the folder's inode and change times), so a poll finds what was
added, replaced or removed; :func:`read_entry` reads a package's ``config.json`` into a :class:`TaskEntry`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ..config import NAME_CHARACTERS, TASK_NAME, TASK_NAME_RULE, as_task_name, check_task_name  # noqa: F401
from ..task_model import CONFIG_FILE, TaskRecord, TaskSpec, package_spec, parse_package_config

HUB_REPO_PREFIX = "models--"


@dataclass
class ServedTask:
    """What a served task is: its name, classes, tuning method, source (package or checkpoint) and eval transform."""

    name: str
    class_names: List[str]
    method: str
    path: Path
    eval_transform: Optional[Dict[str, Any]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "method": self.method, "num_classes": self.num_classes, "classes": self.class_names}


@dataclass(frozen=True)
class TaskEntry:
    """One version of a task as indexed: its spec, where it is and the stamp that tells its version.

    ``origin``: the package folder (or an in-memory task's source); ``stamp``: the folder's ``(inode, mtime_ns,
    ctime_ns)`` (a counter for an in-memory task); ``config``: the SHA-256 of the ``config.json`` read; ``record``: an
    in-memory task's tensors (``None`` for a package, read from ``origin`` on first use); ``rank``: the watched
    folder it is in (0 first; -1 in memory)."""

    name: str
    spec: TaskSpec
    origin: Path
    stamp: Hashable
    config: bytes = b""  # hashlib's digest
    record: Optional[TaskRecord] = None
    rank: int = -1
    version: str = ""  # an in-memory task's version (a package's is known once its files are read)

    @property
    def in_memory(self) -> bool:
        return self.record is not None

    @property
    def config_origin(self) -> str:
        """The file that describes the task, as errors name it: a package's ``config.json``, else its source."""
        return repr(str(self.origin if self.in_memory else self.origin / CONFIG_FILE))

    @property
    def info(self) -> ServedTask:
        spec = self.spec
        names = list(spec.class_names or [str(i) for i in range(spec.num_classes)])
        method = str(spec.tuning.get("name") or spec.tuning.get("method"))
        return ServedTask(self.name, names, method, self.origin, spec.eval_transform)


class Found(NamedTuple):
    """A package found by a scan: its watched folder's rank, its folder and stamp."""

    rank: int
    path: str
    stamp: Hashable


def _hub_package(repo: str) -> Tuple[str, Hashable]:
    """A Hub cache repo folder's served snapshot (the revision ``refs/main`` names) and its folder's stamp."""
    with open(os.path.join(repo, "refs", "main")) as handle:
        revision = handle.read(256).strip()
    path = os.path.join(repo, "snapshots", revision)
    stat = os.stat(path)
    return path, (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)


def scan_folders(
    folders: Sequence[Path], previous: Optional[Mapping[str, Found]] = None, look: Callable[[str], bool] = bool
) -> Tuple[Dict[str, Found], Dict[str, str]]:
    """The packages of ``folders`` by task name (a name in several folders: the first folder's) and the problems
    met (name -> why it is not served).

    A package folder's stamp is read (one ``stat``) when it is new, when the folder's entry is another one than in
    the ``previous`` scan (a folder swapped in or renamed: its inode, which listing a folder gives for free) or when
    ``look(name)`` says so (a sweep that finds files changed inside a folder); else the previous stamp stands.
    Without ``previous``, every folder is read."""
    found: Dict[str, Found] = {}
    problems: Dict[str, str] = {}
    previous = previous or {}
    for rank, folder in enumerate(folders):
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            problems[f"<{folder}>"] = f"watched folder {str(folder)!r} cannot be read ({err.strerror or err})"
            continue
        for item in entries:
            if item.name.startswith("."):
                continue
            try:
                if not item.is_dir():
                    continue
                if item.name.startswith(HUB_REPO_PREFIX):
                    name = as_task_name(item.name.split("--")[-1])
                    old = previous.get(name)
                    if old is None or old.rank != rank or look(name):
                        path, stamp = _hub_package(item.path)
                    else:
                        path, stamp = old.path, old.stamp
                else:
                    name, path = item.name, item.path
                    old = previous.get(name)
                    if old is None or old.path != path or old.stamp[0] != item.inode() or look(name):
                        stat = item.stat()
                        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)
                    else:
                        stamp = old.stamp
            except OSError:  # removed while scanned, or a Hub repo without refs/main: not (yet) a package
                continue
            if name not in previous:
                try:
                    check_task_name(name, f"the folder {path!r}")
                except ValueError as err:
                    problems[name] = str(err)
                    continue
            if name in found:
                if found[name].rank != rank:
                    problems[f"{name}@{rank}"] = f"{path!r} is shadowed by {found[name].path!r}"
                continue
            found[name] = Found(rank, path, stamp)
    return found, problems


def read_entry(name: str, found: Found, config: bytes) -> Tuple[TaskEntry, Optional[Dict[str, Any]]]:
    """A package's :class:`TaskEntry` from the bytes of its ``config.json``, and the backbone identity it records;
    a bad config names the file."""
    folder = Path(found.path)
    path = folder / CONFIG_FILE
    values = parse_package_config(config, path)
    spec = package_spec(values, path)  # values only, as loading a package reads them (its backbone entry too)
    identity = values.get("backbone_identity")
    entry = TaskEntry(name, spec, folder, found.stamp, config=hashlib.sha256(config).digest(), rank=found.rank)
    return entry, identity


def default_task_name(path: Path) -> str:
    """A task's name from its source: the run's task folder for ``<task>/<run>/checkpoints/last.ckpt`` and
    ``<task>/<run>/task``, else the file's stem or the folder's name."""
    path = Path(path)
    if path.parent.name == "checkpoints" and len(path.parents) >= 3:
        return path.parents[2].name
    if path.is_dir() and path.name == "task" and len(path.parents) >= 2:
        return path.parents[1].name
    return as_task_name(path.stem if path.is_file() else path.name)
