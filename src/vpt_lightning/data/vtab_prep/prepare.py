"""Build one VTAB-1k task folder: the images and ``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt``.

Three routes (:func:`route`): ``exact`` reads the source files in TFDS's order with VTAB's slices
(:data:`.sources.EXACT_SOURCES`); ``authors`` takes the train800/val200 named by a split file such as the authors'
``vtab_trainval_splits.json`` from torchvision's copy; ``redrawn`` draws them from torchvision's copy with a seed.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image
from torch.utils.data import ConcatDataset

from ...runs.atomic import atomic_path, write_text_atomic
from ..datasets import DataError
from ..registry import TaskInfo, get_task
from ..vtab import LIST_FILES
from .official_splits import read_split_file, resolve, task_entry
from .source_split import SourceSplit
from .sources import EXACT_SOURCES, TORCHVISION_SOURCES, ExactSource
from .tfds_order import tfds_order
from .torchvision_items import item_files, item_labels

ROUTES = ("exact", "authors", "redrawn")


def route(task: str, official_splits: Optional[Path] = None, redraw: bool = False) -> str:
    """How ``task`` is prepared: ``exact`` unless a split file is given or ``redraw`` asked (or no exact reader)."""
    name = get_task(task, benchmark="vtab").name
    if official_splits is not None:
        return "authors"
    return "redrawn" if redraw or name not in EXACT_SOURCES else "exact"


def _require_modules(task: str, modules: Sequence[str], reader: str = "torchvision") -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        packages = {"cv2": "opencv-python-headless", "tensorflow_datasets": "tensorflow-datasets"}
        extra = "retinopathy" if "cv2" in missing else "tfds" if "tensorflow_datasets" in missing else "prepare"
        raise ModuleNotFoundError(
            f'{reader} needs {missing} to read {task!r}: pip install "vpt-lightning[{extra}]" '
            f"(or {' '.join(packages.get(m, m) for m in missing)})"
        )


def _label(target, offset: int = 0) -> int:
    return int(target[0] if isinstance(target, (tuple, list)) else target) - offset


class _DecodedLabels(Sequence):
    """The labels of a torchvision dataset that keeps no label list, decoded item by item when asked."""

    def __init__(self, dataset, offset: int) -> None:
        self.dataset, self.offset = dataset, offset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return _label(self.dataset[i][1], self.offset)


def torchvision_split(dataset, prefix: str, label_offset: int = 0) -> SourceSplit:
    """A torchvision dataset as a :class:`SourceSplit` named ``<prefix>_<index>``: its files where it reads files
    (copied, not re-encoded), else its decoded images; its label list where it keeps one."""
    files, labels = item_files(dataset), item_labels(dataset)
    suffixes = [Path(f).suffix.lower() for f in files] if files is not None else [".png"] * len(dataset)
    return SourceSplit(
        keys=list(range(len(dataset))),
        labels=_DecodedLabels(dataset, label_offset) if labels is None else [v - label_offset for v in labels],
        names=[f"{prefix}_{i:07d}{suffix}" for i, suffix in enumerate(suffixes)],
        files=[Path(f) for f in files] if files is not None else None,
        decode=None if files is not None else (lambda i: dataset[i][0]),
    )


def _save(image: Union[Image.Image, bytes], path: Path, tmp: Path) -> None:
    if isinstance(image, bytes):
        tmp.write_bytes(image)
    elif path.suffix.lower() in (".jpg", ".jpeg"):
        image.convert("RGB").save(tmp, format="JPEG", quality=72)
    else:
        (image if image.mode in ("L", "RGB") else image.convert("RGB")).save(tmp, format="PNG")


def write_items(split: SourceSplit, indices: Sequence[int], task_dir: Path, folder: str) -> List[str]:
    """Put the examples at ``indices`` under ``task_dir/folder`` and return their list lines, in that order.

    Image files are copied as they are; decoded images are saved as PNG (JPEG where the name says so) and encoded
    bytes written as they are. Writes are atomic; existing images are kept.
    """
    pending = [i for i in indices if not (task_dir / folder / split.names[i]).exists()]
    if pending and split.prefetch is not None:
        split.prefetch(pending)
    lines = []
    for i in indices:
        rel = f"{folder}/{split.names[i]}"
        path = task_dir / rel
        if not path.exists():
            if split.files is not None and not Path(split.files[i]).is_file():
                raise DataError(f"image {str(split.files[i])!r} of {folder} is missing from the source")
            with atomic_path(path) as tmp:
                if split.files is not None:
                    shutil.copyfile(split.files[i], tmp)
                else:
                    _save(split.decode(i), path, tmp)
        lines.append(f"{rel} {int(split.labels[i])}")
    return lines


def write_lists(task_dir: Path, train: List[str], val: List[str], test: List[str]) -> Dict[str, int]:
    """The four list files (train800val200 = train800 then val200); returns the split sizes."""
    for key, lines in (("train", train), ("val", val), ("trainval", train + val), ("test", test)):
        write_text_atomic("\n".join(lines) + "\n", task_dir / LIST_FILES[key])
    return {"train800": len(train), "val200": len(val), "test": len(test)}


def exact_indices(spec: ExactSource, splits: Dict[str, SourceSplit], task: str) -> Dict[str, Tuple[str, List[int]]]:
    """``{train800|val200|test: (tfds split, example indices)}``: VTAB's slices of each split in TFDS's order."""
    orders: Dict[str, List[int]] = {}
    chosen: Dict[str, Tuple[str, List[int]]] = {}
    for name in ("train800", "val200", "test"):
        piece = getattr(spec, name)
        if piece.split not in splits:
            raise DataError(f"{task}: the source has no {piece.split!r} split (it has {sorted(splits)})")
        if piece.split not in orders:
            orders[piece.split] = tfds_order(piece.split, splits[piece.split].keys)
        start, stop = piece.bounds(len(orders[piece.split]))
        chosen[name] = (piece.split, orders[piece.split][start:stop])
    for a, b in (("train800", "val200"), ("train800", "test"), ("val200", "test")):
        if chosen[a][0] == chosen[b][0] and set(chosen[a][1]) & set(chosen[b][1]):
            size = len(splits[chosen[a][0]])
            raise DataError(
                f"{task}: {a} ({getattr(spec, a)}) and {b} ({getattr(spec, b)}) overlap in a "
                f"{chosen[a][0]!r} split of {size} examples; is the source complete?"
            )
    return chosen


def prepare_exact(info: TaskInfo, source: Path, out: Path) -> Dict[str, int]:
    """VTAB-1k's own splits of ``info`` from its source files, in TFDS's order (see :data:`.sources.EXACT_SOURCES`)."""
    spec = EXACT_SOURCES[info.name]
    _require_modules(info.name, spec.requires, reader=f"the {spec.builder} reader")
    source = Path(source).expanduser()
    if not source.is_dir():
        raise DataError(f"--source {str(source)!r} does not exist; {info.name} expects {spec.get}")
    splits = spec.read(source)
    task_dir = out / info.folder
    lines = {
        name: write_items(splits[split], indices, task_dir, f"images/{split}")
        for name, (split, indices) in exact_indices(spec, splits, info.name).items()
    }
    return write_lists(task_dir, lines["train800"], lines["val200"], lines["test"])


def _given_split(official_splits: Path, info, train_set, val_set) -> Tuple[List[int], List[int], object]:
    """train800/val200 indices from a split file (see :mod:`.official_splits`), and the pool they index."""
    source = f"--official-splits {str(official_splits)!r} [{info.name}]"
    train, val = task_entry(read_split_file(official_splits), info, source)
    pool = train_set if val_set is None else ConcatDataset([train_set, val_set])
    splits = {"train": (0, len(train_set))}
    if val_set is not None:
        splits["val"] = (len(train_set), len(val_set))
    files = item_files(pool)
    train_idx, val_idx = resolve(train, files, splits, source), resolve(val, files, splits, source)
    if set(train_idx) & set(val_idx):
        raise ValueError(f"{source}: {len(set(train_idx) & set(val_idx))} image(s) are in both train and val")
    return train_idx, val_idx, pool


def prepare_from_torchvision(
    info: TaskInfo,
    source: Path,
    out: Path,
    download: bool = False,
    seed: int = 0,
    official_splits: Optional[Path] = None,
) -> Dict[str, int]:
    """train800/val200 from torchvision's training split: drawn with ``seed``, or read from ``official_splits``
    (the authors' ``vtab_trainval_splits.json`` of file names, or indices; see :mod:`.official_splits`). Test is
    torchvision's test split, or, where torchvision has none (Caltech101, SUN397, EuroSAT), the images not drawn
    for train/val.
    """
    if info.name not in TORCHVISION_SOURCES:
        raise ValueError(
            f"vpt-prepare vtab cannot build {info.name!r} from torchvision; it covers {sorted(TORCHVISION_SOURCES)}"
        )
    spec = TORCHVISION_SOURCES[info.name]
    _require_modules(info.name, spec.requires)
    try:
        train_set = spec.train(source, download)
        test_set = spec.test(source, download) if spec.test else None
        val_set = spec.val(source, download) if official_splits is not None and spec.val else None
    except RuntimeError as err:  # torchvision: 'Dataset not found or corrupted. You can use download=True ...'
        raise FileNotFoundError(
            f"torchvision could not find {info.name!r} under {str(source)!r} ({err}); pass --download to fetch it"
        ) from err
    if official_splits is not None:
        train_idx, val_idx, train_set = _given_split(official_splits, info, train_set, val_set)
    else:
        order = list(range(len(train_set)))
        random.Random(seed).shuffle(order)
        if len(order) < 1000 + (0 if test_set is not None else 1):
            raise ValueError(f"{info.name}: torchvision's training split has {len(order)} images, VTAB-1k needs 1000")
        train_idx, val_idx = sorted(order[:800]), sorted(order[800:1000])
    task_dir = out / info.folder
    train = torchvision_split(train_set, "train", spec.label_offset)
    train_lines = write_items(train, train_idx, task_dir, "images")
    val_lines = write_items(train, val_idx, task_dir, "images")
    if test_set is None:
        chosen = set(train_idx) | set(val_idx)
        test_lines = write_items(train, [i for i in range(len(train_set)) if i not in chosen], task_dir, "images")
    else:
        test_lines = write_items(
            torchvision_split(test_set, "test", spec.label_offset), range(len(test_set)), task_dir, "images"
        )
    return write_lists(task_dir, train_lines, val_lines, test_lines)


def prepare_vtab_task(
    task: str,
    source: Path,
    out: Path,
    download: bool = False,
    seed: int = 0,
    official_splits: Optional[Path] = None,
    redraw: bool = False,
) -> Dict[str, int]:
    """Write ``out/<task folder>/`` by :func:`route`; returns the split sizes."""
    info = get_task(task, benchmark="vtab")
    if route(task, official_splits, redraw) == "exact":
        if download and info.name in TORCHVISION_SOURCES:  # torchvision fetches the files the exact reader reads
            spec = TORCHVISION_SOURCES[info.name]
            _require_modules(info.name, spec.requires)
            for factory in (spec.train, spec.test):
                if factory is not None:
                    factory(Path(source), True)
        return prepare_exact(info, Path(source), Path(out))
    return prepare_from_torchvision(info, source, out, download, seed, official_splits)
