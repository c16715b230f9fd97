"""``vpt-export onnx TASK --out task.onnx``: export a trained task (backbone + prompts + head, images -> logits,
dynamic batch) to ONNX and check it with onnxruntime against PyTorch on images put through the task's own eval
transform; exit 1 when the largest logit difference is above the tolerance (1e-4 in fp32).

:func:`add_onnx_subcommand` adds the subcommand to ``vpt-export``'s parser (:mod:`vpt_lightning.cli.export`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional

from torch import nn

from .console import plain_text
from .task_arguments import add_pin_and_import_arguments, load_one_task

#: loads a task (a path or hf://OWNER/NAME as typed on the command line) as an ``nn.Module``: images -> logits
ModelLoader = Callable[[str], nn.Module]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def load_for_export(args: argparse.Namespace) -> nn.Module:
    """The task named on the command line (package, ``hf://OWNER/NAME``, ``.ckpt`` or run folder), in eval mode,
    after the operator's own modules (``--import``), on the pinned backbone (``--backbone``) if given, downloading
    timm hub weights only with ``--allow-download``."""
    return load_one_task(args.task, args.backbone, args.imports, args.allow_download).eval()


def list_check_images(folder: Path, limit: int) -> List[Path]:
    """Up to ``limit`` image files of ``folder`` (by suffix, sorted); a clear error when there are none."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {str(folder)!r} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--images {str(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files[:limit]


def add_onnx_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "task",
        metavar="TASK",
        help="the trained task: a package folder (<run>/task), a Hub repo hf://OWNER/NAME, a .ckpt or a run folder",
    )
    add_pin_and_import_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file written")
    parser.add_argument(
        "--images", type=Path, help="a folder of images to check the export on (default: random RGB images)"
    )
    parser.add_argument("--num-images", type=int, default=8, help="images checked (default %(default)s)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest accepted logit difference, onnxruntime vs PyTorch (default 1e-4)",
    )


def run_onnx(args: argparse.Namespace, load_model: Optional[ModelLoader] = None) -> int:
    """Export, check at the full batch and at batch 1, print the largest logit difference; 0, or 1 on failure."""
    try:
        from ..sharing.onnx_export import (
            DEFAULT_OPSET,
            MAX_LOGIT_DIFF,
            check_onnx,
            eval_transform_settings,
            export_onnx,
            model_input_size,
            prepare_images,
            random_images,
            saved_eval_transform,
        )
    except ImportError as err:
        print(f"vpt-export: error: {err}", file=sys.stderr)
        return 1
    tolerance = MAX_LOGIT_DIFF if args.tolerance is None else args.tolerance
    if args.num_images < 1:
        print(f"vpt-export: error: --num-images={args.num_images} must be >= 1", file=sys.stderr)
        return 1
    try:
        model = load_model(args.task) if load_model is not None else load_for_export(args)
        settings = eval_transform_settings(saved_eval_transform(model), model_input_size(model))
        if args.images is not None:
            sources = list_check_images(args.images, args.num_images)
            what = f"{len(sources)} image(s) of {args.images}"
        else:
            sources = random_images(args.num_images, settings["img_size"])
            what = f"{len(sources)} random RGB image(s)"
        images = prepare_images(sources, settings)
        path = export_onnx(model, args.out, settings, opset=args.opset or DEFAULT_OPSET)
        diff = max(check_onnx(model, path, images), check_onnx(model, path, images[:1]))
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as err:
        print(f"vpt-export: error: {err}", file=sys.stderr)
        return 1
    print(
        f"max |logit difference| onnxruntime vs PyTorch: {diff:.3g} on {what} through the task's eval transform "
        f"({settings['recipe']}, {settings['img_size']} px), batches of {len(images)} and 1"
    )
    if not diff <= tolerance:  # also catches NaN
        print(
            f"vpt-export: error: {path} differs from PyTorch by {diff:.3g}, above the tolerance {tolerance:g}; "
            "do not use it",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def add_onnx_subcommand(subparsers: argparse._SubParsersAction, load_model: Optional[ModelLoader] = None):
    """Add ``onnx`` to a ``vpt-export`` parser's subcommands; ``load_model(TASK)`` loads the task (default: any task
    source through :func:`vpt_lightning.sharing.task_sources.load_task`).

    Dispatch with ``args.run(args)`` (set as the parser's default)."""
    parser = subparsers.add_parser(
        "onnx",
        help="export a task to ONNX, checked with onnxruntime",
        description=plain_text(__doc__.split("\n\n")[0]),  # the user's part, filled by argparse
    )
    add_onnx_arguments(parser)
    parser.set_defaults(run=lambda args: run_onnx(args, load_model))
    return parser
