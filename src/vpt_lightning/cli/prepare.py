"""``vpt-prepare``: build VTAB-1k task folders (TFDS's exact splits where the source allows), split FGVC, check.

vpt-prepare vtab --tasks cifar100 eurosat --source ~/vtab-sources --out data/vtab-1k [--download]
vpt-prepare vtab --tasks caltech101 --source ~/torchvision-data --out data/vtab-1k \\
    --official-splits vtab_trainval_splits.json
vpt-prepare fgvc-split --train-json all_train.json --out data/fgvc/CUB_200_2011 [--val-fraction 0.1]
vpt-prepare check vtab --task cifar100 --root data/vtab-1k [--official-splits vtab_trainval_splits.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..data.datasets import DataError, check_images
from ..data.fgvc import FGVCDataModule, make_train_val_split
from ..data.registry import get_task, vtab_tasks
from ..data.vtab import LIST_FILES, VTABDataModule
from ..data.vtab_prep.official_splits import compare, read_split_file, task_entry
from ..data.vtab_prep.prepare import prepare_vtab_task, route
from ..runs.threads import configure_threads
from .console import plain_text, report_errors


def _compare_with_split_file(task: str, root: str, split_file: Path) -> int:
    """Print how a prepared task's train800/val200 compare with a split file's entry; 1 unless both are equal."""
    info = get_task(task, benchmark="vtab")
    train, val = task_entry(read_split_file(split_file), info, f"--official-splits {str(split_file)!r} [{info.name}]")
    status = 0
    for name, key, given in (("train800", "train", train), ("val200", "val", val)):
        path = Path(root) / info.folder / LIST_FILES[key]
        if not path.is_file():
            raise DataError(f"{path} does not exist: prepare {task!r} first (vpt-prepare vtab --tasks {task} ...)")
        ours = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        found, same_order, missing = compare(given, ours)
        print(
            f"{task} {name}: {found} of the {len(given)} in {split_file.name} are among our {len(ours)}"
            f"{', same order' if same_order else ''}" + (f"; missing e.g. {missing[:3]}" if missing else "")
        )
        status |= int(not same_order)
    return status


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


@report_errors("vpt-prepare")
def main(argv: Optional[Sequence[str]] = None) -> int:
    configure_threads()
    parser = argparse.ArgumentParser(
        prog="vpt-prepare", description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    vtab = sub.add_parser("vtab", help="build VTAB-1k task folders (exact TFDS splits where the source allows)")
    vtab.add_argument("--tasks", nargs="+", required=True, help=f"any of {[t.name for t in vtab_tasks()]}")
    vtab.add_argument(
        "--source",
        type=Path,
        required=True,
        help="the folder holding the tasks' source files (torchvision's data root for the tasks it has)",
    )
    vtab.add_argument("--out", type=Path, required=True, help="the VTAB-1k root to write (data.root)")
    vtab.add_argument("--download", action="store_true", help="let torchvision download missing data (tasks it has)")
    vtab.add_argument(
        "--redraw",
        action="store_true",
        help="draw train800/val200 from torchvision's training split with --seed instead of TFDS's order",
    )
    vtab.add_argument("--seed", type=int, default=0, help="the seed of --redraw (and of tasks without an exact reader)")
    vtab.add_argument(
        "--official-splits",
        type=Path,
        help="the authors' vtab_trainval_splits.json (file names of train800/val200 per task), or a JSON "
        '{task: {"train": [...], "val": [...]}} of names or indices into torchvision\'s training split',
    )
    split = sub.add_parser("fgvc-split", help="split a full training JSON into train.json / val.json")
    split.add_argument("--train-json", type=Path, required=True)
    split.add_argument("--out", type=Path, required=True)
    split.add_argument("--val-fraction", type=float, default=0.1)
    split.add_argument("--seed", type=int, default=42)
    check = sub.add_parser(
        "check",
        help="decode every image of a task and report the unreadable ones; compare a "
        "VTAB task's train800/val200 with a split file",
    )
    check.add_argument("benchmark", choices=["vtab", "fgvc"])
    check.add_argument("--task", required=True)
    check.add_argument("--root", required=True)
    check.add_argument("--split", choices=["tune", "final"], default="final")
    check.add_argument(
        "--official-splits",
        type=Path,
        help="also compare train800/val200 with this split file's entry (the authors' JSON)",
    )
    args = parser.parse_args(argv)
    if args.command == "vtab":
        for task in args.tasks:
            how = route(task, args.official_splits, args.redraw)
            sizes = prepare_vtab_task(
                task, args.source, args.out, args.download, args.seed, args.official_splits, args.redraw
            )
            detail = {
                "exact": "TFDS's order and VTAB's slices",
                "authors": f"from {args.official_splits}",
                "redrawn": f"seed {args.seed}",
            }[how]
            print(f"{task}: {sizes} ({how}: {detail}) -> {args.out / get_task(task, 'vtab').folder}")
        return 0
    if args.command == "fgvc-split":
        print(make_train_val_split(args.train_json, args.out, args.val_fraction, args.seed))
        return 0
    status = _check(args.benchmark, args.task, args.root, args.split)
    if args.official_splits is not None:
        if args.benchmark != "vtab":
            parser.error("--official-splits compares VTAB-1k tasks only")
        status |= _compare_with_split_file(args.task, args.root, args.official_splits)
    return status


if __name__ == "__main__":
    sys.exit(main())
