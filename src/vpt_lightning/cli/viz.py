"""``vpt-viz``: PNG figures of runs and protocols (t-SNE, attention maps, prompt ablations, training curves).

    vpt-viz tsne RUN_OR_CHECKPOINT [--split test] [--max-samples 500]
    vpt-viz attention RUN_OR_CHECKPOINT --images DIR [--num-images 3]
    vpt-viz ablation SUMMARY_DIR [SUMMARY_DIR ...]
    vpt-viz curves RUN

Each writes ``--out`` (default: ``<run>/viz/<kind>.png``, or ``<SUMMARY_DIR>/ablation.png``) and, when the run
logged to TensorBoard, MLflow or W&B, adds the figure there too. Needs ``pip install 'vpt-lightning[viz]'``.

A run folder may come from someone else: its config is read as plain values (no ``_target_`` built, no
interpolation resolved), ``--data KEY=VALUE`` gives the t-SNE's data where the run's value does not fit this machine,
and the MLflow store is only the one the operator names (``--mlflow-uri`` or ``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..runs.threads import configure_threads
from .console import plain_text, report_errors
from .task_arguments import add_backbone_arguments


def _key_value(text: str) -> Tuple[str, Any]:
    """``KEY=VALUE`` of ``--data``, the value read as YAML (``17``, ``null``, ``[1, 2]``, a string)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. root=/data/vtab-1k)")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        return key.strip(), value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpt-viz", description=plain_text(__doc__.splitlines()[0]))
    sub = parser.add_subparsers(dest="kind", required=True)
    tsne = sub.add_parser("tsne", help="t-SNE of the final pooled features beside the frozen backbone's")
    tsne.add_argument("path", type=Path, help="a vpt-train run folder, or its checkpoints/last.ckpt")
    tsne.add_argument(
        "--split", default="test", choices=["test", "val", "train"], help="the split drawn (default: test)"
    )
    tsne.add_argument(
        "--max-samples", type=int, default=500, help="images drawn, the first of the split (default: 500)"
    )
    tsne.add_argument(
        "--data",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a value of the run's DataModule instead of the run config's (e.g. root=DIR where its data lives here)",
    )
    attention = sub.add_parser("attention", help="class-token and prompt attention to the patches, per block")
    attention.add_argument("path", type=Path, help="a vpt-train run folder, or a task checkpoint")
    attention.add_argument("--images", type=Path, required=True, help="a folder of image files")
    attention.add_argument(
        "--num-images",
        type=int,
        default=3,
        help="images shown, taken from the folder's sub-folders in turn (one per class of a class-per-folder tree "
        "before a second of any; default: 3)",
    )
    ablation = sub.add_parser(
        "ablation",
        help="test top-1 against prompt length and depth from vpt-tune summaries",
        epilog="e.g. vpt-tune -m +experiment=vtab_cifar100 data.root=DIR recipe.num_tokens=1,10 (a folder per value), "
        "then vpt-viz ablation outputs/vtab_cifar100/protocol/vpt_deep",
    )
    ablation.add_argument("dirs", type=Path, nargs="+", help="folders holding vpt-tune summary.json files")
    curves = sub.add_parser("curves", help="training loss and val top-1 per epoch")
    curves.add_argument("path", type=Path, help="a vpt-train run folder (with csv/metrics.csv)")
    for p in (tsne, attention):
        add_backbone_arguments(p)
    for p in (tsne, attention, ablation, curves):
        p.add_argument("--out", type=Path, default=None, help="the PNG to write")
    for p in (tsne, attention, curves):
        p.add_argument(
            "--mlflow-uri",
            default=None,
            help="the MLflow store to add the figure to, when the run logged to MLflow (default: MLFLOW_TRACKING_URI; "
            "the store a run folder names is never contacted)",
        )
    return parser


def _note(message: str) -> None:
    print(f"vpt-viz: note: {message}", file=sys.stderr)


def _loader(datamodule, split: str):
    datamodule.setup("fit" if split in ("train", "val") else "test")
    if split == "train":
        return datamodule.train_dataloader()
    return datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()


def run(args: argparse.Namespace) -> Path:
    """Draw and write the figure ``args.kind`` asks for; returns the PNG's path."""
    from ..protocol import viz

    run_dir: Optional[Path] = None
    if args.kind == "tsne":
        module, run_dir = viz.load_task_for_viz(args.path, args.backbone, args.allow_download)
        if run_dir is None:
            raise FileNotFoundError(f"{str(args.path)!r}: a t-SNE needs the run folder (its data config)")
        datamodule = viz.run_datamodule(run_dir, module, dict(args.data), notify=_note)
        figure, _ = viz.tsne_figure(
            module,
            _loader(datamodule, args.split),
            module.hparams.get("class_names"),
            args.max_samples,
            f"t-SNE of the {args.split} split's pooled features",
        )
        out = args.out or run_dir / "viz" / f"tsne_{args.split}.png"
    elif args.kind == "attention":
        module, run_dir = viz.load_task_for_viz(args.path, args.backbone, args.allow_download)
        images, shown, names = viz.load_images(args.images, module, args.num_images)
        figure, _ = viz.attention_figure(module, images, shown, names)
        out = args.out or (run_dir or args.path.parent) / "viz" / "attention.png"
    elif args.kind == "ablation":
        from ..protocol.report import find_summaries

        summaries = find_summaries(args.dirs)
        if not summaries:
            raise FileNotFoundError(f"no summary.json below {[str(d) for d in args.dirs]} (run vpt-tune first)")
        figure, _ = viz.ablation_figure(summaries)
        out = args.out or args.dirs[0] / "ablation.png"
    else:
        figure, _ = viz.curves_figure(args.path)
        run_dir = args.path
        out = args.out or args.path / "viz" / "curves.png"
    viz.save_figure(figure, out)
    print(f"wrote {out}")
    logged, skipped = viz.log_image(run_dir, args.kind, out, getattr(args, "mlflow_uri", None))
    for where in logged:
        print(f"logged to {where}")
    for what in skipped:
        _note(what)
    return out


@report_errors("vpt-viz")
def main(argv: Optional[List[str]] = None) -> None:
    configure_threads()
    run(_parser().parse_args(argv))  # an error of the user's: one line, exit code 1 (report_errors)


if __name__ == "__main__":
    main()
