"""Given train800/val200 splits for ``vpt-prepare vtab``: the authors' ``vtab_trainval_splits.json`` or indices.

The authors of VPT released, for 14 VTAB-1k tasks, the file names of the 1,000 training examples they used (the
TFDS ``filename``/``id`` of each). This module finds a task's entry in such a file, whatever name the file uses for
the task (ours, the folder name, or the official ``cifar(num_classes=100)`` style, with or without ``vtab-``), and
resolves each entry to an item of torchvision's copy of the dataset:

- an integer is an index into torchvision's training split;
- a file name (``banded_0002.jpg``) or a path ending (``accordion/image_0001.jpg``) is matched against the files
  torchvision reads; a bare name that several files share (Caltech101's ``image_0001.jpg``) is an error that asks
  for the longer path;
- for datasets torchvision keeps as arrays (CIFAR-100, Patch Camelyon), a TFDS id such as ``train_16399`` is the
  index 16399 of the original training file (torchvision's order), ``validation_12`` the 12th of the validation
  split where torchvision has one.

An entry is ``{"train": [...], "val": [...]}`` (also ``train800``/``val200``), or one list of 1000 items read as
train800 followed by val200. Other sizes than 800/200 are allowed (a warning says so).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..datasets import read_json_object
from ..registry import TaskInfo, normalise_name

TRAIN_KEYS = ("train", "train800")
VAL_KEYS = ("val", "val200")
TFDS_ID = re.compile(r"^(?:([A-Za-z]+)_)?(\d+)$")
SPLIT_PREFIXES = {"train": "train", "validation": "val", "val": "val"}


def read_split_file(path: Path) -> Dict[str, Any]:
    """Read the JSON split file; errors name it."""
    return read_json_object(
        path, "--official-splits", "the authors' vtab_trainval_splits.json, or {task: {train, val}}"
    )


def task_entry(given: Mapping[str, Any], info: TaskInfo, source: str) -> Tuple[List[Any], List[Any]]:
    """The (train, val) entries of ``info`` in a split file, under any of the task's names."""
    keys = [key for key in given if normalise_name(key) in info.aliases]
    if len(keys) != 1:
        found = "several entries " + str(keys) if keys else "no entry"
        raise ValueError(
            f"{source} has {found} for {info.name!r} (its names: {list(info.aliases)}); the file covers {sorted(given)}"
        )
    entry = given[keys[0]]
    if isinstance(entry, Mapping):
        train = next((entry[k] for k in TRAIN_KEYS if k in entry), None)
        val = next((entry[k] for k in VAL_KEYS if k in entry), None)
        if train is None or val is None:
            raise ValueError(
                f"{source}: entry {keys[0]!r} has keys {sorted(entry)}; expected one of {list(TRAIN_KEYS)} and one of "
                f"{list(VAL_KEYS)}"
            )
        if (len(train), len(val)) != (800, 200):
            warnings.warn(
                f"{source}: entry {keys[0]!r} has {len(train)} train and {len(val)} val items (VTAB-1k: 800/200)",
                stacklevel=2,
            )
        return list(train), list(val)
    if isinstance(entry, list) and len(entry) == 1000:
        return list(entry[:800]), list(entry[800:])
    raise ValueError(
        f"{source}: entry {keys[0]!r} must be {{'train': [...], 'val': [...]}} or one list of the 1000 train800 + "
        f"val200 items, got {type(entry).__name__} of length {len(entry) if hasattr(entry, '__len__') else '?'}"
    )


def _tfds_id_index(name: str, splits: Mapping[str, Tuple[int, int]], source: str) -> int:
    """``train_16399`` -> 16399; ``validation_12`` -> the 12th image of the validation split in the pool."""
    match = TFDS_ID.match(name)
    split = SPLIT_PREFIXES.get((match.group(1) or "train").lower()) if match else None
    if match is None or split is None or split not in splits:
        raise ValueError(
            f"{source}: {name!r} is neither an index nor a TFDS id of a split torchvision has here "
            f"({', '.join(p + '_<n>' for p, s in SPLIT_PREFIXES.items() if s in splits)}); torchvision keeps this "
            "dataset in arrays, without file names"
        )
    offset, size = splits[split]
    if int(match.group(2)) >= size:
        raise ValueError(f"{source}: {name!r} is outside the {size} images of torchvision's {split} split")
    return offset + int(match.group(2))


def resolve(
    entries: Sequence[Any], files: Optional[Sequence[str]], splits: Mapping[str, Tuple[int, int]], source: str
) -> List[int]:
    """Indices of ``entries`` (indices, file names or TFDS ids) into a pool of images.

    ``splits`` maps ``train`` (and ``val`` where the pool holds torchvision's validation split too) to its
    ``(offset, size)`` in the pool; ``files`` is the image file of each pool item, ``None`` for array datasets.
    Integers index the training split.
    """
    by_suffix: Dict[int, Dict[Tuple[str, ...], List[int]]] = {}
    indices, missing, ambiguous = [], [], []
    for entry in entries:
        if isinstance(entry, int) and not isinstance(entry, bool):
            if not 0 <= entry < splits["train"][1]:
                raise ValueError(
                    f"{source}: index {entry} is outside torchvision's {splits['train'][1]} training images"
                )
            indices.append(entry)
            continue
        name = str(entry)
        if files is None:
            indices.append(_tfds_id_index(name, splits, source))
            continue
        parts = tuple(p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("/", "."))
        table = by_suffix.get(len(parts))
        if table is None:
            table = by_suffix[len(parts)] = {}
            for i, path in enumerate(files):
                table.setdefault(tuple(PurePosixPath(path).parts[-len(parts) :]), []).append(i)
        hits = table.get(parts, [])
        if len(hits) == 1:
            indices.append(hits[0])
        elif hits:
            ambiguous.append(f"{name!r} ({len(hits)} files, e.g. {files[hits[0]]!r})")
        else:
            missing.append(repr(name))
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} name(s) match no image of torchvision's copy, e.g. {', '.join(missing[:5])}"
        )
    if ambiguous:
        raise ValueError(
            f"{source}: {len(ambiguous)} name(s) match several images, e.g. {', '.join(ambiguous[:3])}; give the "
            "class folder too (class/name.jpg)"
        )
    if len(set(indices)) != len(indices):
        raise ValueError(f"{source}: an image is listed twice")
    return indices


_ID_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
_SUFFIXES = (".jpg", ".jpeg", ".png")


def identity(item: Any) -> Tuple[str, Any]:
    """What an item names, comparable across namings: ``(split, index)`` for indices (training split), TFDS ids
    (``train_16399``, ``validation_12``) and array images written as such (``train_16399.png``), else
    ``("", file name without its image suffix)`` (``banded_0002.jpg`` and ``dtd/banded/banded_0002.jpg`` match)."""
    if isinstance(item, int) and not isinstance(item, bool):
        return "train", item
    name = PurePosixPath(str(item).replace("\\", "/")).name
    stem = name[: -len(PurePosixPath(name).suffix)] if PurePosixPath(name).suffix.lower() in _SUFFIXES else name
    match = TFDS_ID.match(stem)
    if match and match.group(1) and match.group(1).lower() in _ID_SPLITS:
        return _ID_SPLITS[match.group(1).lower()], int(match.group(2))
    return "", stem


def compare(given: Sequence[Any], ours: Sequence[str]) -> Tuple[int, bool, List[Any]]:
    """How many ``given`` items (a split file's entry) ``ours`` (image paths of a prepared list) holds, whether in
    the same order, and the given items missing from ours."""
    mine = [identity(path) for path in ours]
    present = set(mine)
    missing = [item for item in given if identity(item) not in present]
    return len(given) - len(missing), [identity(item) for item in given] == mine, missing
