"""``vpt-export``: convert a trained task for sharing.

vpt-export hub CKPT_OR_RUN --out DIR [--push OWNER/NAME]   # a task package (safetensors + config.json + card)
vpt-export onnx TASK --out task.onnx                       # one ONNX graph, checked with onnxruntime
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ..runs.threads import configure_threads
from .console import plain_text, report_errors
from .export_onnx import ModelLoader, add_onnx_subcommand
from .task_arguments import add_pin_and_import_arguments, load_one_task

RESULTS_FILE = "results.json"


def run_info(source: Path) -> Dict[str, Any]:
    """What a run folder's ``results.json`` says about the task (metrics, parameter counts) for its model card;
    empty when ``source`` is not in a run folder."""
    from ..runs.integrity import read_results

    source = Path(source)
    candidates = [source / RESULTS_FILE, source.parent / RESULTS_FILE]
    if source.parent.name == "checkpoints":
        candidates.append(source.parent.parent / RESULTS_FILE)
    for path in candidates:
        if path.is_file():
            results = read_results(path)  # a regular file of bounded size, JSON object, or a one-line error
            info: Dict[str, Any] = {
                "metrics": {
                    k: float(v)
                    for k, v in results.items()
                    if k.startswith(("val/", "test/")) and isinstance(v, (int, float))
                }
            }
            info.update(
                {
                    k: results[k]
                    for k in ("trainable_params", "backbone_params", "trainable_percent", "epochs")
                    if k in results
                }
            )
            if results.get("task_name"):
                info["datasets"] = [str(results["task_name"])]
            return info
    return {}


def export_hub(args: argparse.Namespace) -> int:
    task = load_one_task(args.source, args.backbone, args.imports, args.allow_download)
    if not task.info:
        task.info = run_info(Path(args.source))
    task.save_pretrained(args.out)
    print(f"vpt-export: task package written to {args.out} ({', '.join(sorted(p.name for p in args.out.iterdir()))})")
    if args.push:
        url = task.push_to_hub(args.push, private=args.private)
        print(f"vpt-export: pushed to {url}")
    return 0


def build_parser(onnx_loader: Optional[ModelLoader] = None) -> argparse.ArgumentParser:
    """The ``vpt-export`` parser; ``onnx_loader`` replaces how ``onnx`` loads its task (tests, other formats)."""
    parser = argparse.ArgumentParser(
        prog="vpt-export", description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    hub = commands.add_parser("hub", help="a task package folder (and optionally push it to the Hugging Face Hub)")
    hub.add_argument(
        "source",
        metavar="CKPT_OR_RUN",
        help="a task checkpoint (.ckpt), a vpt-train run folder, a task package or a Hub repo hf://OWNER/NAME",
    )
    hub.add_argument("--out", required=True, type=Path, help="the package folder written")
    hub.add_argument("--push", metavar="OWNER/NAME", help="also upload the package to this Hub model repo")
    hub.add_argument("--private", action="store_true", help="create the Hub repo as private")
    add_pin_and_import_arguments(hub)
    hub.set_defaults(run=export_hub)
    add_onnx_subcommand(commands, onnx_loader)
    return parser


@report_errors("vpt-export")
def main(argv: Optional[Sequence[str]] = None, onnx_loader: Optional[ModelLoader] = None) -> int:
    configure_threads()
    args = build_parser(onnx_loader).parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"vpt-export: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
