"""``vpt-prepare``: build the VTAB-1k layout from torchvision's datasets, split FGVC, and check image trees.

    vpt-prepare vtab --tasks cifar100 eurosat --source ~/torchvision-data --out data/vtab-1k [--download]
    vpt-prepare fgvc-split --train-json all_train.json --out data/fgvc/CUB_200_2011 [--val-fraction 0.1]
    vpt-prepare check vtab --task cifar100 --root data/vtab-1k      # decode every image, list the bad ones
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..atomic import write_text_atomic
from .datasets import check_images
from .fgvc import FGVCDataModule, make_train_val_split
from .registry import get_task
from .vtab import LIST_FILES, VTABDataModule

# task -> (train-split factory, test-split factory or None when torchvision has no separate test split);
# each factory takes (source root, download flag) and returns a torchvision dataset of (PIL image, label)
Factory = Callable[[Path, bool], object]


def _tv(name: str, **kwargs) -> Factory:
    def make(root: Path, download: bool):
        import torchvision.datasets as tvd

        return getattr(tvd, name)(str(root), download=download, **kwargs)

    return make


TORCHVISION_SOURCES: Dict[str, Tuple[Factory, Optional[Factory]]] = {
    "cifar100": (_tv("CIFAR100", train=True), _tv("CIFAR100", train=False)),
    "svhn": (_tv("SVHN", split="train"), _tv("SVHN", split="test")),
    "dtd": (_tv("DTD", split="train"), _tv("DTD", split="test")),
    "flowers102": (_tv("Flowers102", split="train"), _tv("Flowers102", split="test")),
    "pets": (_tv("OxfordIIITPet", split="trainval"), _tv("OxfordIIITPet", split="test")),
    "patch_camelyon": (_tv("PCAM", split="train"), _tv("PCAM", split="test")),
    "clevr_count": (_tv("CLEVRClassification", split="train"), _tv("CLEVRClassification", split="val")),
    "caltech101": (_tv("Caltech101"), None),
    "sun397": (_tv("SUN397"), None),
    "eurosat": (_tv("EuroSAT"), None),
}


def _label(target) -> int:
    return int(target[0] if isinstance(target, (tuple, list)) else target)


def _write_split(dataset, indices: Sequence[int], task_dir: Path, prefix: str, labels: Dict[int, int]) -> List[str]:
    lines = []
    for i in indices:
        image, target = dataset[i]
        rel = f"images/{prefix}_{i:07d}.png"
        path = task_dir / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.png")
            image.convert("RGB").save(tmp)
            tmp.replace(path)
        labels[i] = _label(target)
        lines.append(f"{rel} {labels[i]}")
    return lines


def prepare_vtab_task(task: str, source: Path, out: Path, download: bool = False, seed: int = 0,
                      official_splits: Optional[Path] = None) -> Dict[str, int]:
    """Write ``out/<task folder>/`` with images and the four list files; returns the split sizes.

    train800/val200 are drawn from torchvision's training split with ``seed`` (or taken from a
    JSON of indices into torchvision's training split, ``{task: {"train": [...], "val": [...]}}``); test is torchvision's test split, or, where torchvision
    has none (Caltech101, SUN397, EuroSAT), the images not drawn for train/val.
    """
    info = get_task(task, benchmark="vtab")
    if info.name not in TORCHVISION_SOURCES:
        raise ValueError(
            f"vpt-prepare vtab cannot build {info.name!r} from torchvision; it covers {sorted(TORCHVISION_SOURCES)}"
        )
    make_train, make_test = TORCHVISION_SOURCES[info.name]
    try:
        train_set = make_train(source, download)
        test_set = make_test(source, download) if make_test else None
    except RuntimeError as err:  # torchvision: 'Dataset not found or corrupted. You can use download=True ...'
        raise FileNotFoundError(
            f"torchvision could not find {info.name!r} under {str(source)!r} ({err}); pass --download to fetch it"
        ) from err
    if official_splits is not None:
        given = json.loads(Path(official_splits).read_text())
        if info.name not in given:
            raise ValueError(f"{official_splits} has no entry for {info.name!r}; it covers {sorted(given)}")
        splits = given[info.name]
        train_idx, val_idx = list(splits["train"]), list(splits["val"])
    else:
        order = list(range(len(train_set)))
        random.Random(seed).shuffle(order)
        if len(order) < 1000 + (0 if test_set is not None else 1):
            raise ValueError(f"{info.name}: torchvision's training split has {len(order)} images, VTAB-1k needs 1000")
        train_idx, val_idx = sorted(order[:800]), sorted(order[800:1000])
    task_dir = out / info.folder
    labels: Dict[int, int] = {}
    train_lines = _write_split(train_set, train_idx, task_dir, "train", labels)
    val_lines = _write_split(train_set, val_idx, task_dir, "train", labels)
    if test_set is None:
        chosen = set(train_idx) | set(val_idx)
        test_set, test_idx = train_set, [i for i in range(len(train_set)) if i not in chosen]
        test_lines = _write_split(test_set, test_idx, task_dir, "train", labels)
    else:
        test_lines = _write_split(test_set, range(len(test_set)), task_dir, "test", {})
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
                      help='a JSON {task: {"train": [indices], "val": [indices]}} into torchvision\'s training split')
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
