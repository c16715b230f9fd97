"""``vpt-prepare``: build the VTAB-1k layout from torchvision's datasets, split FGVC, and check image trees.

    vpt-prepare vtab --tasks cifar100 eurosat --source ~/torchvision-data --out data/vtab-1k [--download]
    vpt-prepare fgvc-split --train-json all_train.json --out data/fgvc/CUB_200_2011 [--val-fraction 0.1]
    vpt-prepare check vtab --task cifar100 --root data/vtab-1k      # decode every image, list the bad ones
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..data.datasets import check_images
from ..data.fgvc import FGVCDataModule, make_train_val_split
from ..data.prepare import prepare_vtab_task
from ..data.registry import get_task
from ..data.sources import TORCHVISION_SOURCES
from ..data.vtab import VTABDataModule


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
