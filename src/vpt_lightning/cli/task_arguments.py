"""The command-line arguments of the commands that load trained tasks (``vpt-predict``, ``vpt-serve``,
``vpt-export``): the operator's backbone pin, own modules and download permission, and loading one task with them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # loading a task imports torch and timm: only when a command loads one
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
