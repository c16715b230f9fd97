"""Predicting image files with trained tasks through Lightning (``Trainer.predict``): ``vpt-predict``'s work."""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..atomic import write_text_atomic
from .images import ImageError, decode_image, task_transforms, top_k
from .multitask import MultiTaskClassifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageItem:
    """One prediction to make: an image file and the task to classify it with."""

    path: Path
    task: str


def list_images(source: os.PathLike, tasks: Sequence[str], task: Optional[str] = None) -> List[ImageItem]:
    """The images of a folder (every non-hidden file below it, sorted) or of a CSV file (a ``path`` column,
    relative to the CSV's folder, and an optional ``task`` column), each with its task.

    A row's ``task`` wins, else ``task``; without either, every image is classified by every task.
    """
    source = Path(source).expanduser()
    if task is not None and task not in tasks:
        raise ValueError(f"--task {task!r} is not one of the loaded tasks {list(tasks)}")
    rows: List[Tuple[Path, Optional[str]]]
    if source.is_dir():
        rows = [
            (p, None) for p in sorted(source.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
        ]
    elif source.is_file():
        with open(source, newline="") as handle:
            reader = csv.DictReader(handle)
            if "path" not in (reader.fieldnames or []):
                raise ValueError(f"{str(source)!r}: a CSV of images needs a 'path' column (and optionally 'task')")
            rows = [(source.parent / r["path"], (r.get("task") or "").strip() or None) for r in reader]
        unknown = sorted({t for _, t in rows if t is not None and t not in tasks})
        if unknown:
            raise ValueError(f"{str(source)!r}: task(s) {unknown} in column 'task' are not among the tasks {list(tasks)}")
    else:
        raise FileNotFoundError(f"--images {str(source)!r} is neither a folder nor a CSV file")
    items = []
    for path, row_task in rows:
        chosen = row_task or task
        items += [ImageItem(path, t) for t in ([chosen] if chosen else tasks)]
    if not items:
        raise ValueError(f"--images {str(source)!r} holds no image")
    return items


class ImageFiles(Dataset):
    """Reads, decodes and transforms each item's image for its task; an unreadable one becomes an error entry
    (``strict``: raises :class:`ImageError` naming the file instead)."""

    def __init__(self, items: Sequence[ImageItem], model: MultiTaskClassifier, strict: bool = False) -> None:
        self.items = list(items)
        self.transforms = task_transforms(model)
        self.task_index = {name: i for i, name in enumerate(model.task_names)}
        self.strict = strict

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self.items[index]
        try:
            try:
                data = item.path.read_bytes()
            except OSError as err:
                raise ImageError(f"{item.path}: cannot be read ({err.strerror or err})") from err
            image = self.transforms[item.task](decode_image(data, str(item.path)))
        except ImageError as err:
            if self.strict:
                raise
            return {"item": index, "error": str(err)}
        return {"item": index, "image": image, "task": self.task_index[item.task]}


def collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack the readable images; keep the unreadable ones' errors."""
    good = [s for s in samples if "error" not in s]
    batch: Dict[str, Any] = {"errors": [(s["item"], s["error"]) for s in samples if "error" in s]}
    if good:
        batch["images"] = torch.stack([s["image"] for s in good])
        batch["task_index"] = torch.tensor([s["task"] for s in good], dtype=torch.long)
        batch["items"] = torch.tensor([s["item"] for s in good], dtype=torch.long)
    return batch


class MultiTaskPredictor(pl.LightningModule):
    """A :class:`MultiTaskClassifier` for ``Trainer.predict`` (devices, precision, progress bar): each batch gives
    the items' class probabilities (softmax over their task's classes) and the unreadable items' errors."""

    def __init__(self, model: MultiTaskClassifier) -> None:
        super().__init__()
        self.model = model

    def predict_step(self, batch: Dict[str, Any], batch_idx: int) -> Dict[str, Any]:
        out: Dict[str, Any] = {"errors": batch["errors"]}
        if "images" in batch:
            logits = self.model(batch["images"], batch["task_index"])
            out["items"] = batch["items"].cpu()
            out["probabilities"] = logits.float().softmax(dim=-1).cpu()
        return out


def predict_images(
    model: MultiTaskClassifier,
    items: Sequence[ImageItem],
    k: int = 5,
    batch_size: int = 64,
    num_workers: int = 0,
    strict: bool = False,
    trainer: Optional[pl.Trainer] = None,
) -> Tuple[List[Dict[str, Any]], List[Tuple[Path, str]]]:
    """Classify ``items`` with ``Trainer.predict``; returns the predictions (``path``, ``task``, ``top``: the top-k
    classes with probabilities) in item order and the ``(path, reason)`` of the unreadable images (skipped)."""
    loader = DataLoader(ImageFiles(items, model, strict), batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    trainer = trainer or pl.Trainer(accelerator="cpu", logger=False, enable_model_summary=False)
    outputs = trainer.predict(MultiTaskPredictor(model), dataloaders=loader) or []
    predictions: Dict[int, Dict[str, Any]] = {}
    skipped: List[Tuple[Path, str]] = []
    for out in outputs:
        skipped += [(items[i].path, reason) for i, reason in out["errors"]]
        if "items" in out:
            for i, probs in zip(out["items"].tolist(), out["probabilities"]):
                info = model.infos[items[i].task]
                predictions[i] = {"path": str(items[i].path), "task": info.name, "top": top_k(probs, info, k)}
    unique = list(dict.fromkeys(skipped))  # an image classified by several tasks failed once per task
    return [predictions[i] for i in sorted(predictions)], unique


def predictions_csv(predictions: Sequence[Dict[str, Any]], k: int) -> str:
    """``path, task, class_1, probability_1, ..., class_k, probability_k`` (empty cells past a task's classes)."""
    handle = io.StringIO()
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(["path", "task"] + [f"{c}_{r}" for r in range(1, k + 1) for c in ("class", "probability")])
    for p in predictions:
        cells = [v for top in p["top"] for v in (top["class"], f"{top['probability']:.6f}")]
        writer.writerow([p["path"], p["task"]] + cells + [""] * (2 * k - len(cells)))
    return handle.getvalue()


def write_predictions(predictions: Sequence[Dict[str, Any]], k: int, path: os.PathLike) -> None:
    write_text_atomic(predictions_csv(predictions, k), Path(path))
