"""``vpt-prepare``: build the VTAB-1k layout from torchvision's datasets, split FGVC, and check image trees.

    vpt-prepare vtab --tasks cifar100 eurosat --source ~/torchvision-data --out data/vtab-1k [--download]
    vpt-prepare fgvc-split --train-json all_train.json --out data/fgvc/CUB_200_2011 [--val-fraction 0.1]
    vpt-prepare check vtab --task cifar100 --root data/vtab-1k      # decode every image, list the bad ones
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch.utils.data import ConcatDataset

from ..atomic import write_text_atomic
from .datasets import check_images
from .fgvc import FGVCDataModule, make_train_val_split
from .official_splits import read_split_file, resolve, task_entry
from .registry import get_task
from .torchvision_items import item_files, item_labels
from .vtab import LIST_FILES, VTABDataModule

# each factory takes (source root, download flag) and returns a torchvision dataset of (PIL image, label)
Factory = Callable[[Path, bool], object]


def _tv(name: str, **kwargs) -> Factory:
    def make(root: Path, download: bool):
        import torchvision.datasets as tvd

        return getattr(tvd, name)(str(root), download=download, **kwargs)

    return make


@dataclass(frozen=True)
class TorchvisionSource:
    """How to read one VTAB task from torchvision's copy of its dataset.

    Attributes:
        train: the original training split (train800/val200 are drawn from it).
        test: the test split; ``None`` where torchvision has none (the images not drawn become the test set).
        val: the original validation split, searched too when a given split names its images (the authors'
            val200 of DTD and Flowers102 comes from it).
        label_offset: subtracted from torchvision's label (CLEVR's object counts 3..10 -> VTAB's classes 0..7).
        requires: modules torchvision needs to read this dataset (the ``prepare`` extra).
    """

    train: Factory
    test: Optional[Factory] = None
    val: Optional[Factory] = None
    label_offset: int = 0
    requires: Tuple[str, ...] = ()


TORCHVISION_SOURCES: Dict[str, TorchvisionSource] = {
    "cifar100": TorchvisionSource(_tv("CIFAR100", train=True), _tv("CIFAR100", train=False)),
    "svhn": TorchvisionSource(_tv("SVHN", split="train"), _tv("SVHN", split="test"), requires=("scipy",)),
    "dtd": TorchvisionSource(_tv("DTD", split="train"), _tv("DTD", split="test"), _tv("DTD", split="val")),
    "flowers102": TorchvisionSource(_tv("Flowers102", split="train"), _tv("Flowers102", split="test"),
                                    _tv("Flowers102", split="val"), requires=("scipy",)),
    "pets": TorchvisionSource(_tv("OxfordIIITPet", split="trainval"), _tv("OxfordIIITPet", split="test")),
    "patch_camelyon": TorchvisionSource(_tv("PCAM", split="train"), _tv("PCAM", split="test"), _tv("PCAM", split="val"),
                                        requires=("h5py",)),
    # VTAB's CLEVR test set is CLEVR's validation split (the test split has no labels)
    "clevr_count": TorchvisionSource(_tv("CLEVRClassification", split="train"),
                                     _tv("CLEVRClassification", split="val"), label_offset=3),
    "caltech101": TorchvisionSource(_tv("Caltech101"), requires=("scipy",)),
    "sun397": TorchvisionSource(_tv("SUN397")),
    "eurosat": TorchvisionSource(_tv("EuroSAT")),
}


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
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            if files is not None:
                shutil.copyfile(files[i], tmp)
            else:
                image.convert("RGB").save(tmp, format="PNG")
            tmp.replace(path)
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


def _check(benchmark: str, task: str, root: str, split: str) -> int:
    module_cls = VTABDataModule if benchmark == "vtab" else FGVCDataModule
    dm = module_cls(task=task, root=root, split=split, num_workers=0)
    dm.setup()
    problems = []
    for name in ("train_dataset", "val_dataset", "test_dataset"):
        dataset = getattr(dm, name)
        if dataset is not None:
            problems += check_images(dataset.samples)
    for problem in sorted(set(problems)):
        print(problem)
    print(f"{benchmark} {task} ({split}): {len(set(problems))} unreadable image(s)")
    return 1 if problems else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vpt-prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    vtab = sub.add_parser("vtab", help="build VTAB-1k task folders from torchvision datasets")
    vtab.add_argument("--tasks", nargs="+", required=True, help=f"any of {sorted(TORCHVISION_SOURCES)}")
    vtab.add_argument("--source", type=Path, required=True, help="torchvision's data root")
    vtab.add_argument("--out", type=Path, required=True, help="the VTAB-1k root to write (data.root)")
    vtab.add_argument("--download", action="store_true", help="let torchvision download missing data")
    vtab.add_argument("--seed", type=int, default=0)
    vtab.add_argument("--official-splits", type=Path,
                      help="the authors' vtab_trainval_splits.json (file names of train800/val200 per task), or a JSON "
                           '{task: {"train": [...], "val": [...]}} of names or indices into torchvision\'s training split')
    split = sub.add_parser("fgvc-split", help="split a full training JSON into train.json / val.json")
    split.add_argument("--train-json", type=Path, required=True)
    split.add_argument("--out", type=Path, required=True)
    split.add_argument("--val-fraction", type=float, default=0.1)
    split.add_argument("--seed", type=int, default=42)
    check = sub.add_parser("check", help="decode every image of a task and report the unreadable ones")
    check.add_argument("benchmark", choices=["vtab", "fgvc"])
    check.add_argument("--task", required=True)
    check.add_argument("--root", required=True)
    check.add_argument("--split", choices=["tune", "final"], default="final")
    args = parser.parse_args(argv)
    if args.command == "vtab":
        for task in args.tasks:
            sizes = prepare_vtab_task(task, args.source, args.out, args.download, args.seed, args.official_splits)
            print(f"{task}: {sizes} -> {args.out / get_task(task, 'vtab').folder}")
        return 0
    if args.command == "fgvc-split":
        print(make_train_val_split(args.train_json, args.out, args.val_fraction, args.seed))
        return 0
    return _check(args.benchmark, args.task, args.root, args.split)


if __name__ == "__main__":
    sys.exit(main())
