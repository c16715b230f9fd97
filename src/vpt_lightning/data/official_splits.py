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
  index 16399 of the original training file, which is torchvision's order.

An entry is ``{"train": [...], "val": [...]}`` (also ``train800``/``val200``), or one list of more than 800 items
read as train800 followed by val200.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .registry import TaskInfo, normalise_name

TRAIN_KEYS = ("train", "train800")
VAL_KEYS = ("val", "val200")
TFDS_ID = re.compile(r"^(?:[A-Za-z]+_)?(\d+)$")


def read_split_file(path: Path) -> Dict[str, Any]:
    """Read the JSON split file; errors name it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--official-splits {str(path)!r} does not exist")
    try:
        given = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--official-splits {str(path)!r} is not valid JSON ({err})") from err
    if not isinstance(given, dict):
        raise ValueError(f"--official-splits {str(path)!r}: expected a JSON object {{task: split}}")
    return given


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
        return list(train), list(val)
    if isinstance(entry, list) and len(entry) > 800:
        return list(entry[:800]), list(entry[800:])
    raise ValueError(
        f"{source}: entry {keys[0]!r} must be {{'train': [...], 'val': [...]}} or one list of train800 + val200 "
        f"items, got {type(entry).__name__} of length {len(entry) if hasattr(entry, '__len__') else '?'}"
    )


def item_files(dataset: Any) -> Optional[List[str]]:
    """The image file of each item of a torchvision dataset, or ``None`` when it keeps its images in arrays."""
    if hasattr(dataset, "datasets"):  # ConcatDataset
        parts = [item_files(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [f for p in parts for f in p]
    if hasattr(dataset, "samples"):  # ImageFolder (EuroSAT)
        return [PurePosixPath(Path(p)).as_posix() for p, _ in dataset.samples]
    for attr in ("_image_files", "_images"):  # DTD, Flowers102, SUN397, CLEVR / Oxford-IIIT Pet
        if hasattr(dataset, attr):
            return [Path(p).as_posix() for p in getattr(dataset, attr)]
    if all(hasattr(dataset, a) for a in ("categories", "y", "index")):  # Caltech101
        return [f"{dataset.categories[y]}/image_{i:04d}.jpg" for y, i in zip(dataset.y, dataset.index)]
    return None


def resolve(entries: Sequence[Any], files: Optional[Sequence[str]], size: int, source: str) -> List[int]:
    """Indices of ``entries`` (indices, file names or TFDS ids) among ``size`` items with image ``files``."""
    by_suffix: Dict[int, Dict[Tuple[str, ...], List[int]]] = {}
    indices, missing, ambiguous = [], [], []
    for entry in entries:
        if isinstance(entry, int) and not isinstance(entry, bool):
            if not 0 <= entry < size:
                raise ValueError(f"{source}: index {entry} is outside torchvision's {size} images")
            indices.append(entry)
            continue
        name = str(entry)
        if files is None:
            match = TFDS_ID.match(name)
            if match is None or int(match.group(1)) >= size:
                raise ValueError(
                    f"{source}: {name!r} is neither an index nor a TFDS id (e.g. 'train_00012') of the {size} images; "
                    "torchvision keeps this dataset in arrays, without file names"
                )
            indices.append(int(match.group(1)))
            continue
        parts = tuple(p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("/", "."))
        table = by_suffix.get(len(parts))
        if table is None:
            table = by_suffix[len(parts)] = {}
            for i, path in enumerate(files):
                table.setdefault(tuple(PurePosixPath(path).parts[-len(parts):]), []).append(i)
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
