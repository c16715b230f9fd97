"""The pictures behind ``vpt-viz``: what the VPT paper and its readers look at, drawn from runs of this package.

- :func:`tsne_figure`: t-SNE of the final pooled features of a test split, coloured by class, beside the frozen
  backbone's own pooled features (the paper's t-SNE comparison of VPT with the linear probe);
- :func:`attention_figure`: per block, the attention of the class token to the patches and of the prompts to the
  patches, from timm's :class:`~timm.utils.AttentionExtract` (softmax outputs caught at ``attn_drop``);
- :func:`ablation_figure`: test top-1 against prompt length and prompt depth from ``vpt-tune`` summaries, seeds as
  error bars (the paper's prompt length and depth ablations, Sec. 4.3);
- :func:`curves_figure`: training loss and val top-1 per epoch from a run's ``csv/metrics.csv``.

Each returns the numbers it drew, so that they can be checked; :func:`save_figure` writes the PNG atomically.
"""

from __future__ import annotations

import io
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..module import VPTModule
from ..runs.atomic import write_bytes_atomic
from ..runs.training import last_checkpoint
from ..sharing.csv_files import csv_rows


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("vpt-viz needs matplotlib and scikit-learn: pip install 'vpt-lightning[viz]'") from err
    return plt


def save_figure(figure: Any, path: Path, dpi: int = 90) -> Path:
    """Write ``figure`` as a PNG (atomically) and close it."""
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(buffer.getvalue(), Path(path))
    return Path(path)


# ---- loading a trained task ---------------------------------------------------------------------------------
def load_task_for_viz(
    path: Path, backbone: Any = None, allow_download: bool = False
) -> Tuple[VPTModule, Optional[Path]]:
    """The trained model of a run folder (its ``checkpoints/last.ckpt``) or of a checkpoint file, in eval mode,
    and the run folder when there is one (its ``.hydra/config.yaml`` says which data the run trained on).

    The checkpoint is someone else's file (:meth:`VPTModule.load_from_checkpoint`'s rules): ``backbone`` pins the
    frozen backbone (``--backbone``, e.g. the weights file it names, which is never opened otherwise), and timm's hub
    weights are downloaded only with ``allow_download`` (``--allow-download``).

    The one place where ``vpt-viz`` loads models: switch it to task packages here.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        ckpt = last_checkpoint(path)
        if not ckpt.is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a run folder: {str(ckpt)!r} does not exist")
        run_dir: Optional[Path] = path
    elif path.is_file():
        ckpt, run_dir = path, (path.parent.parent if path.parent.name == "checkpoints" else None)
    else:
        raise FileNotFoundError(f"{str(path)!r} does not exist (give a run folder or a task checkpoint)")
    module = VPTModule.load_from_checkpoint(
        str(ckpt), map_location="cpu", backbone=backbone, allow_download=allow_download
    )
    return module.eval(), run_dir


def run_datamodule(run_dir: Path, module: VPTModule, overrides: Optional[Dict[str, Any]] = None, **notify: Any) -> Any:
    """The run's DataModule, rebuilt from the plain values of its composed config (``.hydra/config.yaml``; never
    instantiated: :func:`vpt_lightning.runs.run_folder.datamodule_from_run`, which ``notify`` goes to), preparing images
    as at training. ``overrides``: the operator's ``--data KEY=VALUE``."""
    from ..runs.run_folder import datamodule_from_run

    datamodule = datamodule_from_run(run_dir, overrides, **notify)
    datamodule.backbone_data_config = module.data_config
    return datamodule


# ---- t-SNE ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def pooled_features(module: VPTModule, loader: Any, max_samples: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(prompted features, frozen backbone features, labels)`` of up to ``max_samples`` images: the pooled
    feature the head reads, and the same timm model's own pooled feature without prompts (the linear probe's)."""
    prompted, frozen, labels = [], [], []
    timm_model = module.backbone.model
    seen = 0
    for images, targets in loader:
        prompted.append(module.backbone(images))
        frozen.append(timm_model.forward_head(timm_model.forward_features(images), pre_logits=True))
        labels.append(targets)
        seen += len(targets)
        if seen >= max_samples:
            break
    cut = slice(0, max_samples)
    return (torch.cat(prompted)[cut].numpy(), torch.cat(frozen)[cut].numpy(), torch.cat(labels)[cut].numpy())


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """scikit-learn's t-SNE of ``features`` to 2-D (PCA init, perplexity 30 or fewer for small sets)."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def tsne_figure(
    module: VPTModule, loader: Any, class_names: Optional[Sequence[str]] = None, max_samples: int = 500, title: str = ""
) -> Tuple[Any, Dict[str, np.ndarray]]:
    """Two t-SNE panels (frozen backbone | this task's prompted features), points coloured by class."""
    plt = _pyplot()
    prompted, frozen, labels = pooled_features(module, loader, max_samples)
    data = {
        "frozen": tsne_embedding(frozen),
        "prompted": tsne_embedding(prompted),
        "labels": labels,
        "frozen_features": frozen,
        "prompted_features": prompted,
    }
    figure, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    method = module.tuning_config.method
    for ax, key, name in zip(
        axes,
        ("frozen", "prompted"),
        ("frozen backbone (linear probe's features)", f"{method} ({module.prompt_config.num_tokens} prompts)"),
    ):
        points = data[key]
        scatter = ax.scatter(
            points[:, 0], points[:, 1], c=labels, cmap="tab10" if labels.max() < 10 else "tab20", s=8, alpha=0.85
        )
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, _ = scatter.legend_elements(num=None)
    names = [str(class_names[i]) if class_names else str(i) for i in np.unique(labels)]
    figure.legend(handles, names, loc="center right", fontsize=7, title="class", title_fontsize=8)
    figure.suptitle(title or "t-SNE of the final pooled features", fontsize=11)
    figure.subplots_adjust(right=0.86)
    return figure, data


# ---- attention ------------------------------------------------------------------------------------------------
@torch.no_grad()
def attention_maps(module: VPTModule, images: torch.Tensor) -> Dict[str, Any]:
    """Per block, the softmax attention of every token (timm's :class:`~timm.utils.AttentionExtract` with hooks
    on ``attn_drop``; fused attention is switched off meanwhile, which computes the same outputs).

    Returns ``attention`` (blocks, batch, heads, tokens, tokens), ``cls_to_patches`` (blocks, batch, grid_h,
    grid_w, averaged over heads), ``prompts_to_patches`` (the same, averaged over heads and prompts; ``None``
    without prompt tokens) and the token layout (``num_prefix``, ``num_prompts``, ``grid``).
    """
    from timm.utils import AttentionExtract

    backbone = module.backbone
    vit = backbone.model
    if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
        raise ValueError(f"vpt-viz attention needs a ViT backbone, not {type(vit).__name__}")
    attns = [block.attn for block in vit.blocks]
    fused = [getattr(a, "fused_attn", False) for a in attns]
    for a in attns:
        a.fused_attn = False
    try:
        extractor = AttentionExtract(backbone, names=["model.blocks.*.attn.attn_drop"], method="hook")
        caught = extractor(images)
    finally:
        for a, was in zip(attns, fused):
            a.fused_attn = was
    attention = torch.stack([caught[name] for name in extractor.names])  # blocks, B, heads, N, N
    start = backbone.num_prefix_tokens
    prompts = backbone.num_prompt_tokens
    grid = tuple(vit.patch_embed.grid_size)
    patches = attention[..., start + prompts :]
    if patches.shape[-1] != grid[0] * grid[1]:
        raise ValueError(
            f"{patches.shape[-1]} patch tokens do not make the {grid} grid (a location other than 'prepend'?)"
        )
    cls = patches[:, :, :, 0].mean(2).reshape(*patches.shape[:2], *grid)
    prompt_rows = patches[:, :, :, start : start + prompts].mean(dim=(2, 3)) if prompts else None
    return {
        "attention": attention,
        "cls_to_patches": cls,
        "prompts_to_patches": prompt_rows.reshape(*patches.shape[:2], *grid) if prompt_rows is not None else None,
        "num_prefix": start,
        "num_prompts": prompts,
        "grid": grid,
    }


def attention_figure(
    module: VPTModule, images: torch.Tensor, shown: Optional[np.ndarray] = None, names: Sequence[str] = ()
) -> Tuple[Any, Dict[str, Any]]:
    """For each image: the image, then per block the class token's and the prompts' attention to the patches.

    Each row (one image's class-token maps, or its prompts' maps, across the blocks) has one colour scale, from the
    row's smallest to its largest weight, and a colour bar: the blocks of a row compare directly, while a row of
    flatter maps (the prompts' average) is not washed out by a sharper one."""
    plt = _pyplot()
    maps = attention_maps(module, images)
    blocks, batch = maps["cls_to_patches"].shape[:2]
    kinds = [("cls_to_patches", "[CLS]")] + ([("prompts_to_patches", "prompts")] if maps["num_prompts"] else [])
    rows = len(kinds)
    figure, axes = plt.subplots(
        batch * rows,
        blocks + 1,
        figsize=(1.05 * (blocks + 1) + 0.8, 1.1 * batch * rows + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for b in range(batch):
        for r, (key, label) in enumerate(kinds):
            row = axes[b * rows + r]
            row[0].axis("off")
            if r == 0 and shown is not None:
                row[0].imshow(shown[b])
                row[0].set_title(names[b] if b < len(names) else f"image {b}", fontsize=8)
            values = maps[key][:, b].numpy()
            low, high = float(values.min()), float(values.max())
            for k in range(blocks):
                drawn = row[k + 1].imshow(values[k], cmap="viridis", vmin=low, vmax=high)
                row[k + 1].set_xticks([])
                row[k + 1].set_yticks([])
                if b == 0 and r == 0:
                    row[k + 1].set_title(f"block {k}", fontsize=8)
            row[1].set_ylabel(label, fontsize=8)
            bar = figure.colorbar(drawn, ax=list(row[1:]), fraction=0.04, pad=0.02, aspect=12)
            bar.ax.tick_params(labelsize=7)
    who = "class token" + (" (top) and prompts (bottom)" if rows == 2 else "")
    figure.suptitle(
        f"attention of the {who} to the patches, per block\ncolour: attention weight (mean over heads), one scale "
        "per row, from the row's smallest to its largest weight",
        fontsize=9,
    )
    return figure, maps


def image_files(folder: Path, count: int) -> List[Path]:
    """Up to ``count`` image files of ``folder``, taken from its sub-folders in turn (the first file of each
    sub-folder in sorted order, then the second of each...): on a class-per-folder tree, one image per class before
    a second of any. Files at the top of ``folder`` are a group of their own, taken first."""
    from ..data.folder import IMAGE_SUFFIXES  # the image files a folder dataset reads

    if count < 1:
        raise ValueError(f"--num-images must be at least 1, not {count}")
    groups: Dict[Path, List[Path]] = defaultdict(list)
    for path in sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        groups[path.parent].append(path)
    if not groups:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(folder)!r}")
    ordered = [groups[parent] for parent in sorted(groups)]  # the folder itself sorts before its sub-folders
    in_turn = [group[k] for k in range(max(map(len, ordered))) for group in ordered if k < len(group)]
    return in_turn[:count]


def load_images(
    folder: Path, module: VPTModule, count: int, max_image_pixels: Optional[int] = None
) -> Tuple[torch.Tensor, np.ndarray, List[str]]:
    """Up to ``count`` images of ``folder`` (:func:`image_files`: across its sub-folders), prepared as the run's
    evaluation images, as shown, and their paths relative to ``folder``.

    Each is read as ``vpt-predict`` reads an image file: a regular file only (a FIFO or a device is refused, never
    read), at most :data:`~vpt_lightning.serving.predict.MAX_FILE_BYTES`, its pixel count checked before decoding
    (``max_image_pixels``, default :data:`~vpt_lightning.serving.images.MAX_IMAGE_PIXELS`)."""
    from ..data.transforms import build_transform
    from ..serving.images import decode_image
    from ..serving.predict import read_image_file

    files = image_files(folder, count)
    # the run's evaluation transform (kept in the checkpoint), as vpt-predict prepares image files
    settings = module.hparams.get("eval_transform") or {}
    transform = build_transform(
        settings.get("recipe", "vtab"),
        train=False,
        img_size=int(settings.get("img_size") or module.data_config["input_size"][-1]),
        mean=settings.get("mean", (0.485, 0.456, 0.406)),
        std=settings.get("std", (0.229, 0.224, 0.225)),
        interpolation=settings.get("interpolation", "bicubic"),
    )
    pil = [decode_image(read_image_file(p), str(p), max_image_pixels) for p in files]
    batch = torch.stack([transform(img) for img in pil])
    size = batch.shape[-2:]
    shown = np.stack([np.asarray(img.resize((size[1], size[0]))) for img in pil])
    return batch, shown, [p.relative_to(folder).as_posix() for p in files]


# ---- ablation -------------------------------------------------------------------------------------------------
def _final_prompt(summary: Dict[str, Any]) -> Dict[str, Any]:
    """The prompt config of a summary's final runs (their ``results.json``)."""
    from .report import final_run_config

    config = final_run_config(summary)
    if not config:
        return {}
    return {**config.get("prompt", {}), "backbone_depth": config.get("backbone", {}).get("kwargs", {}).get("depth")}


def ablation_points(
    summaries: Sequence[Dict[str, Any]],
) -> Dict[str, Dict[str, List[Tuple[float, float, float, List[float]]]]]:
    """``{"length"|"depth": {series: [(x, mean, std, per-seed test top-1s)]}}`` from ``vpt-tune`` summaries: x is
    the prompt length (the selected one when the sweep swept it) or the number of prompted blocks; a series is a
    task / tuning pair. Summaries that share everything but the other axis make one line."""
    table: Dict[str, Dict[Any, List[Tuple[float, float, float, List[float]]]]] = {
        "length": defaultdict(list),
        "depth": defaultdict(list),
    }
    for summary in summaries:
        prompt = _final_prompt(summary)
        length = summary["selected"].get("num_tokens") or prompt.get("num_tokens")
        depth = prompt.get("depth")
        blocks = prompt.get("backbone_depth")
        depth = (
            depth
            if isinstance(depth, int)
            else len(depth)
            if isinstance(depth, list)
            else (blocks if prompt.get("deep", True) else 1)
        )
        seeds = [float(v) for v in summary["test_top1_per_seed"].values()]
        entry = (statistics.fmean(seeds), statistics.stdev(seeds) if len(seeds) > 1 else 0.0, seeds)
        series = f"{summary['task_name']} / {summary['tuning']}"
        if length is not None:
            table["length"][(series, depth)].append((float(length), *entry))
        if depth is not None:
            table["depth"][(series, length)].append((float(depth), *entry))
    out: Dict[str, Dict[str, List[Tuple[float, float, float, List[float]]]]] = {}
    for axis, lines in table.items():
        other = "depth" if axis == "length" else "p"
        out[axis] = {
            f"{series} ({other}={value})": sorted(points)
            for (series, value), points in lines.items()
            if len({p[0] for p in points}) > 1
        }
    return out


def ablation_figure(summaries: Sequence[Dict[str, Any]]) -> Tuple[Any, Dict[str, Any]]:
    """Test top-1 (mean over seeds, standard deviation as error bars) against prompt length and prompt depth."""
    plt = _pyplot()
    data = ablation_points(summaries)
    if not any(data.values()):
        raise ValueError(
            f"{len(summaries)} summaries, but none differ in prompt length or depth only: run vpt-tune "
            "with several recipe.num_tokens / prompt.depth values (or protocol.num_tokens=[...])"
        )
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, axis, label in zip(axes, ("length", "depth"), ("prompt length p", "prompted blocks (depth)")):
        for name, points in data[axis].items():
            xs, means, stds = zip(*[(p[0], 100 * p[1], 100 * p[2]) for p in points])
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("test top-1 (%)")
        if axis == "length" and data[axis]:
            ax.set_xscale("log")
        if data[axis]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no summaries vary this", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    figure.suptitle("test top-1 at the last epoch, mean ± std over seeds", fontsize=10)
    return figure, data


# ---- curves ---------------------------------------------------------------------------------------------------
def epoch_curves(run_dir: Path) -> Dict[str, List[Tuple[int, float]]]:
    """Per epoch, from the run's ``csv/metrics.csv``: ``train/loss_epoch`` and ``val/top1`` as ``(epoch, value)``."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist (the run needs the csv logger: logger=[csv,...])")
    curves: Dict[str, List[Tuple[int, float]]] = {"train/loss_epoch": [], "val/top1": []}
    for row in csv_rows(path):
        for key in curves:
            if row.get(key) not in (None, "") and row.get("epoch") not in (None, ""):
                try:
                    curves[key].append((int(float(row["epoch"])), float(row[key])))
                except ValueError:
                    raise ValueError(
                        f"{str(path)!r}: epoch {row['epoch']!r}, {key} {row[key]!r}: not numbers"
                    ) from None
    if not any(curves.values()):
        raise ValueError(f"{str(path)!r} holds no per-epoch train/loss_epoch or val/top1")
    return curves


def curves_figure(run_dir: Path) -> Tuple[Any, Dict[str, List[Tuple[int, float]]]]:
    """Training loss and val top-1 against the epoch."""
    plt = _pyplot()
    curves = epoch_curves(run_dir)
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, label, scale in zip(
        axes, ("train/loss_epoch", "val/top1"), ("training loss", "val top-1 (%)"), (1, 100)
    ):
        if curves[key]:
            epochs, values = zip(*curves[key])
            ax.plot(epochs, [scale * v for v in values], marker="o", markersize=3)
        else:
            ax.text(0.5, 0.5, "not logged (no val split)", ha="center", va="center", transform=ax.transAxes)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    figure.suptitle(f"{Path(run_dir).parent.name}/{Path(run_dir).name}", fontsize=10)
    return figure, curves


# ---- logging --------------------------------------------------------------------------------------------------
def log_image(
    run_dir: Optional[Path], tag: str, png: Path, mlflow_uri: Optional[str] = None
) -> Tuple[List[str], List[str]]:
    """Add the PNG to the run's trackers where the run logged to them: its TensorBoard folder (an image summary),
    MLflow (an artifact of the run of the run folder's name, in the store ``mlflow_uri`` or ``MLFLOW_TRACKING_URI``
    names) and W&B (an image in a ``viz`` run beside the run's own, see :func:`_log_wandb_image`).

    The run's ``.hydra/config.yaml`` says which trackers it used; its values are read as written (never resolved,
    :mod:`vpt_lightning.runs.run_folder`), and the tracking store it names is never contacted: only the operator's.
    Returns where the figure was logged, and what was skipped (with how to enable it)."""
    if run_dir is None:
        return [], []
    from ..runs.run_folder import plain_value, read_run_config, run_config_path

    logged: List[str] = []
    skipped: List[str] = []
    tensorboard = Path(run_dir) / "tensorboard"
    if tensorboard.is_dir():
        try:
            from PIL import Image
            from torch.utils.tensorboard import SummaryWriter

            pixels = np.asarray(Image.open(png).convert("RGB"))
            with SummaryWriter(str(tensorboard)) as writer:
                writer.add_image(f"viz/{tag}", pixels, dataformats="HWC")
            logged.append(f"tensorboard ({tensorboard})")
        except ImportError:
            pass
    if not run_config_path(run_dir).is_file():
        return logged, skipped
    saved = read_run_config(run_dir)
    trackers = saved.get("logger") if isinstance(saved.get("logger"), dict) else {}
    if "mlflow" in trackers:
        uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            experiment = plain_value(saved, "logger.mlflow.experiment_name", "vpt-lightning")
            logged += _log_mlflow_artifact(run_dir, uri, str(experiment), png)
        else:
            skipped.append(
                f"not added to the run's MLflow store: vpt-viz never connects to the store a run folder names "
                f"(logger.mlflow.tracking_uri in {str(run_config_path(run_dir))!r}); give yours with --mlflow-uri URI "
                "(or MLFLOW_TRACKING_URI) to add it there"
            )
    if "wandb" in trackers:
        settings = {
            key: plain_value(saved, key) for key in ("logger.wandb.project", "logger.wandb.entity", "tracking.group")
        }
        logged += _log_wandb_image(run_dir, settings, tag, png)
    return logged, skipped


def _log_mlflow_artifact(run_dir: Path, uri: str, experiment_name: str, png: Path) -> List[str]:
    """Log the PNG as an artifact (``viz/``) of the latest run named after the run folder, in the operator's store."""
    from ..runs.tracking import _absolute_sqlite, run_label

    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        return []
    client = MlflowClient(tracking_uri=_absolute_sqlite(str(uri)))
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.runName` = '{run_label(run_dir)}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return []
    client.log_artifact(runs[0].info.run_id, str(png), artifact_path="viz")
    return [f"mlflow run {runs[0].info.run_id}"]


def _log_wandb_image(run_dir: Path, settings: Dict[str, Any], tag: str, png: Path) -> List[str]:
    """Log the PNG as a ``wandb.Image`` under ``viz/<tag>`` to a new W&B run of the run's project and group, named
    after the run, ``job_type="viz"``, saved in the run folder; offline unless ``WANDB_MODE`` is set, as training.

    Not the run's own W&B run: wandb (0.31) does not resume offline runs (``wandb.init(id=..., resume="allow")``
    or ``"must"`` starts a fresh offline run with the same id, without its name, group or steps)."""
    from ..runs.tracking import finish_wandb_run, run_label

    try:
        import wandb
    except ImportError:
        return []
    os.environ.setdefault("WANDB_MODE", "offline")
    group = settings.get("tracking.group")
    run = wandb.init(
        dir=str(run_dir),
        project=str(settings.get("logger.wandb.project") or "vpt-lightning"),
        entity=settings.get("logger.wandb.entity"),
        group=str(group) if group else None,
        name=run_label(run_dir),
        job_type="viz",
        reinit="create_new",
    )
    run.log({f"viz/{tag}": wandb.Image(str(png))})
    return [f"wandb run {run.id} ({finish_wandb_run(run)})"]
