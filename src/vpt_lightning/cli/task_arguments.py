"""The command-line arguments of the commands that load trained tasks (``vpt-predict``, ``vpt-serve``,
``vpt-export``): the tasks and task folders, the operator's backbone pin, own modules and download permission, and
loading the tasks with them. Light to import: torch and timm are imported when a command loads a task."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # loading a task imports torch and timm: only when a command loads one
    from ..serving.task_store import TaskStore
    from ..task_model import TaskModel


def lightning_devices(text: str) -> "int | str":
    """``--devices``: a count in ASCII digits becomes an int (``str.isdigit`` also takes '²', which ``int`` refuses),
    Lightning's other spellings (``auto``, ``0,1``, ``-1``) stay text for Lightning to check."""
    if text.isascii() and text.isdigit():
        return int(text)
    if text == "auto" or (text.isascii() and text.replace(",", "").lstrip("-").isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: give a device count (2), 'auto', or device indices (0,1)")


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backbone NAME_OR_FILE`` (pin the frozen backbone) and ``--allow-download`` (the timm hub weights a task
    names may be downloaded)."""
    parser.add_argument(
        "--backbone",
        metavar="NAME_OR_FILE",
        help="pin the frozen backbone instead of the tasks' own config: a packaged backbone config "
        "name (quickstart_vit...), a .yaml/.json of backbone fields, or a weights file",
    )
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help="let a task whose backbone is timm's hub weights (pretrained: true) download them; without it, "
        "loading makes no network request but for an explicit Hub source hf://OWNER/NAME",
    )


def add_pin_and_import_arguments(parser: argparse.ArgumentParser) -> None:
    """:func:`add_backbone_arguments` and ``--import FILE_OR_MODULE`` (repeatable)."""
    add_backbone_arguments(parser)
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="FILE_OR_MODULE",
        help="import your own module first (a .py file or a dotted name), e.g. the one that "
        "registers a custom head with vpt_lightning.heads.register_head; repeatable",
    )


def load_one_task(
    source: str, backbone: Optional[str] = None, imports: Sequence[str] = (), allow_download: bool = False
) -> "TaskModel":
    """The task at ``source`` (package, Hub repo ``hf://OWNER/NAME``, ``.ckpt`` or run folder), after the operator's
    own modules (``--import``), on the pinned backbone (``--backbone``) if given, downloading the timm hub weights it
    names only with ``allow_download`` (``--allow-download``)."""
    from ..heads import import_user_code
    from ..sharing.task_sources import load_task

    for target in imports:
        import_user_code(target)
    return load_task(source, backbone=backbone, allow_download=allow_download)


def cache_size(text: str) -> int:
    """``--cache-bytes``: a size such as ``2GiB`` (see :func:`vpt_lightning.serving.task_cache.parse_bytes`)."""
    from ..serving.task_cache import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The tasks a command serves or predicts with (``TASK...``, ``--tasks DIR...``, ``--cache-bytes``, ``--pin``),
    ``--top-k``, and :func:`add_pin_and_import_arguments`."""
    parser.add_argument(
        "checkpoints",
        nargs="*",
        metavar="TASK",
        help="tasks: package folders (<run>/task of vpt-train), Hub repos hf://OWNER/NAME, .ckpt files or run "
        "folders, optionally NAME=TASK (held in memory)",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        metavar="DIR",
        help="folders of task packages, one per sub-folder named by the task (or Hub cache repos "
        "models--OWNER--NAME): indexed from their config.json, loaded on first use (give TASK... before it)",
    )
    parser.add_argument(
        "--cache-bytes",
        type=cache_size,
        default=None,
        metavar="SIZE",
        help="the most memory the tasks of --tasks may hold, e.g. 2GiB: the least recently used leave first "
        "(default: no bound)",
    )
    parser.add_argument(
        "--pin", nargs="+", default=[], metavar="NAME", help="tasks always held in memory (loaded at start)"
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes reported per image (default 5)")
    add_pin_and_import_arguments(parser)


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` when :func:`add_model_arguments`' values do not go together."""
    if not args.checkpoints and not args.tasks:
        parser.error("give tasks (TASK...) or task folders (--tasks DIR...)")
    if (args.cache_bytes is not None or args.pin) and not args.tasks:
        parser.error("--cache-bytes and --pin apply to task folders (--tasks DIR...)")


def load_task_store(args: argparse.Namespace) -> "TaskStore":
    """The tasks :func:`add_model_arguments`' values name, on one shared backbone
    (:func:`vpt_lightning.serving.multitask.load_tasks`)."""
    from ..serving.multitask import load_tasks

    return load_tasks(
        args.checkpoints, args.backbone, args.imports, args.tasks, args.cache_bytes, args.pin, args.allow_download
    )
