"""Images in, predictions out: decoding image bytes, each task's evaluation transform, top-k classes.

Shared by ``vpt-predict`` and ``vpt-serve`` so that a file and an HTTP upload are prepared exactly alike, and as in
evaluation after training (the transform settings saved in the task checkpoint).
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import torch
from PIL import Image, UnidentifiedImageError

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
from .task_index import ServedTask
from .task_store import TaskStore

#: images with more pixels than this are refused before decoding (``--max-image-pixels``; 4096 x 4096)
MAX_IMAGE_PIXELS = 16 * 2**20
#: the formats read (PIL's names); any other (EPS, PSD, ICO, ...) is refused without running its decoder
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


class ImageError(ValueError):
    """Bytes that are not a readable image (``too_large``: an image beyond the pixel limit)."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def decode_image(data: bytes, source: str = "image", max_pixels: Optional[int] = None) -> Image.Image:
    """Decode image bytes to RGB; :class:`ImageError` names ``source`` and the reason.

    Only :data:`IMAGE_FORMATS` are read (a GIF or multi-page TIFF gives its first frame). The size in the header
    is checked against ``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`) before any pixel is decoded (PIL's own
    process-wide decompression-bomb limit is left as it is: a library call must not change it for its caller).
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if not data:
        raise ImageError(f"{source}: empty, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:  # reads the header only
                if image.width * image.height > limit:
                    raise ImageError(
                        f"{source}: {image.width}x{image.height} = {image.width * image.height} pixels is more than "
                        f"the limit of {limit}",
                        too_large=True,
                    )
                if getattr(image, "n_frames", 1) > 1:
                    image.seek(0)  # GIF, multi-page TIFF: the first frame
                return image.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{source}: more pixels than the limit of {limit} ({err})", too_large=True) from err
    except UnidentifiedImageError as err:
        raise ImageError(f"{source}: not an image in a format read here ({', '.join(IMAGE_FORMATS)})") from err
    except Exception as err:  # PIL raises many types for broken files: name the source and the reason
        raise ImageError(f"{source}: not a readable image ({type(err).__name__}: {err})") from err


def eval_transform(info: ServedTask, model: TaskStore) -> Callable[[Image.Image], torch.Tensor]:
    """The task's evaluation transform (saved at training); checkpoints without one: resize to the backbone's input
    size, ImageNet mean/std (the training default)."""
    settings: Mapping[str, Any] = info.eval_transform or {}
    size = settings.get("img_size") or model.backbone.data_config()["input_size"][-1]
    return build_transform(
        settings.get("recipe", "vtab"),
        train=False,
        img_size=int(size),
        mean=settings.get("mean", IMAGENET_MEAN),
        std=settings.get("std", IMAGENET_STD),
        interpolation=settings.get("interpolation", "bicubic"),
    )


def task_transforms(
    model: TaskStore, names: Optional[Iterable[str]] = None
) -> Dict[str, Callable[[Image.Image], torch.Tensor]]:
    """Each task's evaluation transform (of the tasks ``names``, default all), by task name; tasks prepared alike
    share one transform."""
    built: Dict[str, Callable[[Image.Image], torch.Tensor]] = {}
    out = {}
    for name in model.task_names if names is None else names:
        info = model.entry(name).info
        key = json.dumps(info.eval_transform, sort_keys=True, default=str)
        if key not in built:
            built[key] = eval_transform(info, model)
        out[name] = built[key]
    return out


def top_k(probabilities: torch.Tensor, info: ServedTask, k: int) -> List[Dict[str, Any]]:
    """The ``k`` most probable classes of one image of task ``info`` (fewer if it has fewer classes)."""
    values, indices = probabilities[: info.num_classes].float().topk(min(k, info.num_classes))
    return [
        {"index": int(i), "class": info.class_names[int(i)], "probability": float(p)}
        for p, i in zip(values.tolist(), indices.tolist())
    ]


def check_top_k(k: Optional[int]) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"top_k={k!r} must be a positive integer")
    return k
