"""Build one VTAB-1k task folder (images + the four list files) from torchvision's copy of its dataset."""

from __future__ import annotations

import importlib.util
import random
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from torch.utils.data import ConcatDataset

from ..atomic import atomic_path, write_text_atomic
from .official_splits import read_split_file, resolve, task_entry
from .registry import get_task
from .sources import TORCHVISION_SOURCES
from .torchvision_items import item_files, item_labels
from .vtab import LIST_FILES

def _require_modules(task: str, modules: Sequence[str]) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"torchvision needs {missing} to read {task!r}: pip install \"vpt-lightning[prepare]\" (or {' '.join(missing)})"
        )


def _label(target, offset: int = 0) -> int:
    return int(target[0] if isinstance(target, (tuple, list)) else target) - offset


def _write_split(dataset, indices: Sequence[int], task_dir: Path, prefix: str, label_offset: int) -> List[str]:
    """Put the images at ``indices`` under ``task_dir/images`` and return their list lines.

    Where torchvision reads image files, the original file is copied (no re-encoding) and the label read from
    its label list; array datasets are decoded and saved as PNG. Writes are atomic; existing images are kept.
    """
    files, labels = item_files(dataset), item_labels(dataset)
    lines = []
    for i in indices:
        suffix = Path(files[i]).suffix.lower() if files is not None else ".png"
        rel = f"images/{prefix}_{i:07d}{suffix}"
        path = task_dir / rel
        image = target = None
        if labels is None or (files is None and not path.exists()):
            image, target = dataset[i]
        if not path.exists():
            with atomic_path(path) as tmp:
                if files is not None:
                    shutil.copyfile(files[i], tmp)
                else:
                    image.convert("RGB").save(tmp, format="PNG")
        lines.append(f"{rel} {_label(labels[i] if labels is not None else target, label_offset)}")
    return lines


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


def prepare_vtab_task(task: str, source: Path, out: Path, download: bool = False, seed: int = 0,
                      official_splits: Optional[Path] = None) -> Dict[str, int]:
    """Write ``out/<task folder>/`` with images and the four list files; returns the split sizes.

    train800/val200 are drawn from torchvision's training split with ``seed``, or read from ``official_splits``
    (the authors' ``vtab_trainval_splits.json`` of file names, or indices; see :mod:`.official_splits`). Test is
    torchvision's test split, or, where torchvision has none (Caltech101, SUN397, EuroSAT), the images not drawn
    for train/val.
    """
    info = get_task(task, benchmark="vtab")
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
    train_lines = _write_split(train_set, train_idx, task_dir, "train", spec.label_offset)
    val_lines = _write_split(train_set, val_idx, task_dir, "train", spec.label_offset)
    if test_set is None:
        chosen = set(train_idx) | set(val_idx)
        test_idx = [i for i in range(len(train_set)) if i not in chosen]
        test_lines = _write_split(train_set, test_idx, task_dir, "train", spec.label_offset)
    else:
        test_lines = _write_split(test_set, range(len(test_set)), task_dir, "test", spec.label_offset)
    for key, lines in (("train", train_lines), ("val", val_lines), ("trainval", train_lines + val_lines), ("test", test_lines)):
        write_text_atomic("\n".join(lines) + "\n", task_dir / LIST_FILES[key])
    return {"train800": len(train_lines), "val200": len(val_lines), "test": len(test_lines)}
