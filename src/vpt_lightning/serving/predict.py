"""Predicting image files with trained tasks through Lightning (``Trainer.predict``): ``vpt-predict``'s work."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..sharing.csv_files import csv_rows, csv_text, write_csv_atomic
from ..sharing.regular_files import RefusedFileError, read_regular_file
from .images import MAX_IMAGE_PIXELS, ImageError, decode_image, task_transforms, top_k
from .task_store import TaskStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageItem:
    """One prediction to make: an image file and the task to classify it with."""

    path: Path
    task: str


#: image files larger than this are reported, not read (``vpt-predict --max-file-bytes``)
MAX_FILE_BYTES = 64 * 2**20


def list_images(
    source: os.PathLike, tasks: Sequence[str], task: Optional[str] = None, root: Optional[os.PathLike] = None
) -> List[ImageItem]:
    """The images of a folder (every non-hidden entry below it that is not a folder, sorted) or of a CSV file (a
    ``path`` column and an optional ``task`` column), each with its task.

    A CSV's paths must be relative and stay inside ``root`` (default: the CSV's folder) once resolved (``..`` and
    symbolic links followed): an absolute path or one escaping the root is refused with a ``ValueError`` naming the
    rows, before anything is read. A row's ``task`` wins, else ``task``; without either, every image is classified
    by every task.
    """
    source = Path(source).expanduser()
    if task is not None and task not in tasks:
        raise ValueError(f"--task {task!r} is not one of the loaded tasks {list(tasks)}")
    rows: List[Tuple[Path, Optional[str]]]
    if source.is_dir():
        rows = [
            (p, None)
            for p in sorted(source.rglob("*"))
            if not p.is_dir() and not any(part.startswith(".") for part in p.relative_to(source).parts)
        ]
    elif source.is_file():
        base = Path(root).expanduser() if root is not None else source.parent
        if not base.is_dir():
            raise FileNotFoundError(f"--root {str(base)!r} is not a folder")
        base = base.resolve()
        listed = [
            ((r.get("path") or "").strip(), (r.get("task") or "").strip() or None)
            for r in csv_rows(source, required="path")
        ]
        refused = []
        rows = []
        for line, (name, row_task) in enumerate(listed, start=2):
            path = Path(name)
            if not name or path.is_absolute() or not (base / path).resolve().is_relative_to(base):
                refused.append(f"line {line}: {name!r}")
            rows.append((base / path, row_task))
        if refused:
            shown = "; ".join(refused[:5]) + (f"; and {len(refused) - 5} more" if len(refused) > 5 else "")
            raise ValueError(
                f"{str(source)!r}: paths must be relative and stay inside the root folder {str(base)!r} "
                f"(--root DIR to choose another): {shown}"
            )
        unknown = sorted({t for _, t in rows if t is not None and t not in tasks})
        if unknown:
            raise ValueError(
                f"{str(source)!r}: task(s) {unknown} in column 'task' are not among the tasks {list(tasks)}"
            )
    else:
        raise FileNotFoundError(f"--images {str(source)!r} is neither a folder nor a CSV file")
    items = []
    for path, row_task in rows:
        chosen = row_task or task
        items += [ImageItem(path, t) for t in ([chosen] if chosen else tasks)]
    if not items:
        raise ValueError(f"--images {str(source)!r} holds no image")
    return items


def read_image_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else (a FIFO, a device, a socket, a larger
    file) raises :class:`ImageError` without being read
    (:func:`vpt_lightning.sharing.regular_files.read_regular_file`)."""
    try:
        return read_regular_file(path, max_bytes, limit_hint="--max-file-bytes")
    except RefusedFileError as err:
        raise ImageError(str(err)) from err


class ImageFiles(Dataset):
    """Reads, decodes and transforms each item's image for its task; an unreadable one becomes an error entry
    (``strict``: raises :class:`ImageError` naming the file instead)."""

    def __init__(
        self,
        items: Sequence[ImageItem],
        model: TaskStore,
        strict: bool = False,
        max_file_bytes: int = MAX_FILE_BYTES,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.items = list(items)
        self.transforms = task_transforms(model, sorted({item.task for item in self.items}))
        self.task_index = {name: i for i, name in enumerate(model.task_names)}
        self.strict = strict
        self.max_file_bytes = max_file_bytes
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self.items[index]
        try:
            data = read_image_file(item.path, self.max_file_bytes)
            image = self.transforms[item.task](decode_image(data, str(item.path), self.max_image_pixels))
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
    """A :class:`TaskStore` for ``Trainer.predict`` (devices, precision, progress bar): each batch gives
    the items' class probabilities (softmax over their task's classes) and the unreadable items' errors."""

    def __init__(self, model: TaskStore) -> None:
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
    model: TaskStore,
    items: Sequence[ImageItem],
    k: int = 5,
    batch_size: int = 64,
    num_workers: int = 0,
    strict: bool = False,
    trainer: Optional[pl.Trainer] = None,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> Tuple[List[Dict[str, Any]], List[Tuple[Path, str]]]:
    """Classify ``items`` with ``Trainer.predict``; returns the predictions (``path``, ``task``, ``top``: the top-k
    classes with probabilities) in item order and the ``(path, reason)`` of the unreadable images (skipped)."""
    files = ImageFiles(items, model, strict, max_file_bytes, max_image_pixels)
    loader = DataLoader(files, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    trainer = trainer or pl.Trainer(accelerator="cpu", logger=False, enable_model_summary=False)
    outputs = trainer.predict(MultiTaskPredictor(model), dataloaders=loader) or []
    predictions: Dict[int, Dict[str, Any]] = {}
    skipped: List[Tuple[Path, str]] = []
    infos = {name: model.entry(name).info for name in {item.task for item in items}}
    for out in outputs:
        skipped += [(items[i].path, reason) for i, reason in out["errors"]]
        if "items" in out:
            for i, probs in zip(out["items"].tolist(), out["probabilities"]):
                info = infos[items[i].task]
                predictions[i] = {"path": str(items[i].path), "task": info.name, "top": top_k(probs, info, k)}
    unique = list(dict.fromkeys(skipped))  # an image classified by several tasks failed once per task
    return [predictions[i] for i in sorted(predictions)], unique


def predictions_csv(predictions: Sequence[Dict[str, Any]], k: int) -> str:
    """``path, task, class_1, probability_1, ..., class_k, probability_k`` (empty cells past a task's classes;
    text a spreadsheet would run as a formula starts with a single quote:
    :func:`vpt_lightning.sharing.csv_files.csv_text`)."""
    rows = []
    for p in predictions:
        cells = [v for top in p["top"] for v in (top["class"], f"{top['probability']:.6f}")]
        rows.append([p["path"], p["task"]] + cells + [""] * (2 * k - len(cells)))
    header = ["path", "task"] + [f"{c}_{r}" for r in range(1, k + 1) for c in ("class", "probability")]
    return csv_text(header, rows)  # class names, task names and paths: cells a spreadsheet would run are escaped


def write_predictions(predictions: Sequence[Dict[str, Any]], k: int, path: os.PathLike) -> None:
    write_csv_atomic(predictions_csv(predictions, k), path)
