"""``vpt-predict TASK... --images DIR|CSV [--task NAME] --out predictions.csv``: classify image files with trained
tasks (one shared backbone), top-k classes with their probabilities."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import pytorch_lightning as pl

from ..runs.threads import configure_threads
from ..serving.images import MAX_IMAGE_PIXELS, ImageError
from ..serving.multitask import parse_sources
from ..serving.predict import MAX_FILE_BYTES, list_images, predict_images, write_predictions
from .console import report_errors
from .task_arguments import add_model_arguments, check_model_arguments, lightning_devices, load_task_store


def parse_checkpoints(values: Sequence[str]) -> Union[List[str], Dict[str, str]]:
    """``SOURCE`` or ``NAME=SOURCE`` arguments (see :func:`vpt_lightning.serving.multitask.parse_sources`)."""
    return parse_sources(values)


@report_errors("vpt-predict")
def main(argv: Optional[Sequence[str]] = None) -> int:
    configure_threads()
    parser = argparse.ArgumentParser(prog="vpt-predict", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument(
        "--images",
        required=True,
        type=Path,
        help="a folder of images, or a CSV with a 'path' column (and optionally 'task')",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="the folder a CSV's relative paths are read from and must stay inside (default: the "
        "CSV's folder); absolute paths and paths escaping it are refused",
    )
    parser.add_argument(
        "--max-file-bytes",
        type=int,
        default=MAX_FILE_BYTES,
        help="larger image files are reported, not read (default %(default)s = 64 MiB)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        help="larger images (width x height, from the header) are reported, not decoded "
        "(default %(default)s = 4096 x 4096)",
    )
    parser.add_argument("--task", help="the task for every image (default: the CSV's 'task' column, else every task)")
    parser.add_argument(
        "--out", type=Path, default=Path("predictions.csv"), help="the CSV written (default %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers reading images (default 0)")
    parser.add_argument(
        "--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, mps (default auto)"
    )
    parser.add_argument("--devices", default=1, type=lightning_devices, help="Lightning devices (default 1)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision: 32-true, bf16-mixed, 16-mixed...")
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first unreadable image instead of skipping it"
    )
    parser.add_argument("--no-progress-bar", action="store_true")
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    for name in ("top_k", "batch_size", "max_file_bytes", "max_image_pixels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        model = load_task_store(args)
        items = list_images(args.images, model.task_names, args.task, args.root)
        trainer = pl.Trainer(
            accelerator=args.accelerator,
            devices=args.devices,
            precision=args.precision,
            logger=False,
            enable_model_summary=False,
            enable_progress_bar=not args.no_progress_bar,
        )
        predictions, skipped = predict_images(
            model,
            items,
            args.top_k,
            args.batch_size,
            args.num_workers,
            args.strict,
            trainer,
            args.max_file_bytes,
            args.max_image_pixels,
        )
    except (ValueError, FileNotFoundError) as err:  # ImageError is a ValueError: --strict stops on it
        kind = "unreadable image" if isinstance(err, ImageError) else "error"
        print(f"vpt-predict: {kind}: {err}", file=sys.stderr)
        return 1
    for _path, reason in skipped:
        print(f"vpt-predict: skipped unreadable image {reason}", file=sys.stderr)
    write_predictions(predictions, args.top_k, args.out)
    names = model.task_names
    shown = ", ".join(names) if len(names) <= 20 else ", ".join(names[:20]) + f", ... ({len(names) - 20} more)"
    print(
        f"{len(predictions)} predictions ({len(names)} task(s): {shown}) "
        f"written to {args.out}" + (f"; {len(skipped)} unreadable image(s) skipped" if skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
