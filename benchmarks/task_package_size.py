"""Size of the task package of ViT-B/16 VPT-Deep p=50 (random init, built offline: no download).

    python benchmarks/task_package_size.py                      # ViT-B/16, 50 deep prompts, 100 classes
    python benchmarks/task_package_size.py --num-tokens 10 --num-classes 10

Builds the task with the same factory as training (``build_task_model``), writes its package with
``save_pretrained`` and prints the size of each file next to the backbone's own weights; the package must stay
under ``--limit-mb`` (5 MB: only prompts and head travel, never the backbone). Exits 1 above the limit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from vpt_lightning.task_model import TaskSpec, build_task_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_base_patch16_224.orig_in21k")
    parser.add_argument("--num-tokens", type=int, default=50)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--limit-mb", type=float, default=5.0)
    args = parser.parse_args()
    spec = TaskSpec(
        num_classes=args.num_classes,
        backbone={"name": args.backbone, "pretrained": False},  # timm.create_model(pretrained=False): offline
        prompt={"num_tokens": args.num_tokens, "deep": True},
        tuning={"method": "vpt_deep"},
        task_name="package_size",
    )
    task = build_task_model(spec)
    backbone_bytes = sum(t.numel() * t.element_size() for t in task.backbone.model.state_dict().values())
    trained = sum(t.numel() for t in task.trained_state_dict().values())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "task"
        task.save_pretrained(folder)
        sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    total = sum(sizes.values())
    print(f"backbone {args.backbone}: {backbone_bytes / 1e6:.1f} MB of weights (not in the package)")
    print(f"VPT-Deep p={args.num_tokens}, {args.num_classes} classes: {trained:,} trained values")
    for name, size in sizes.items():
        print(f"  {name:<18} {size / 1e6:8.3f} MB")
    print(
        f"task package: {total / 1e6:.2f} MB ({100 * total / backbone_bytes:.2f}% of the backbone); "
        f"limit {args.limit_mb} MB: {'ok' if total <= args.limit_mb * 1e6 else 'ABOVE'}"
    )
    return 0 if total <= args.limit_mb * 1e6 else 1


if __name__ == "__main__":
    sys.exit(main())
