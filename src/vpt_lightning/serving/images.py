"""Images in, predictions out: decoding image bytes, each task's evaluation transform, top-k classes.

Shared by ``vpt-predict`` and ``vpt-serve`` so that a file and an HTTP upload are prepared exactly alike, and as in
evaluation after training (the transform settings saved in the task checkpoint).
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from PIL import Image, TiffImagePlugin, UnidentifiedImageError

from ..sharing.onnx_export import image_transform
from ..task_model import top_classes
from .task_index import ServedTask
from .task_store import TaskStore

#: images with more pixels than this are refused before decoding (``--max-image-pixels``; 4096 x 4096)
MAX_IMAGE_PIXELS = 16 * 2**20
#: the formats read (PIL's names); any other (EPS, PSD, ICO, ...) is refused without running its decoder
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
#: TIFFs whose first image has more strips or tiles than this are refused before PIL reads them (it builds one
#: decoder entry per strip in Python: 2 million one-row strips, 16 MB, cost ~11 s; 4096 one-row strips are fine)
MAX_IMAGE_TILES = 2**16
#: the largest ``top_k`` a request may ask for (fewer are returned when the task has fewer classes)
MAX_TOP_K = 1_000_000


class ImageError(ValueError):
    """Bytes that are not a readable image (``too_large``: an image beyond the pixel limit)."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def decode_image(data: bytes, source: str = "image", max_pixels: Optional[int] = None) -> Image.Image:
    """Decode image bytes to RGB; :class:`ImageError` names ``source`` and the reason.

    Only :data:`IMAGE_FORMATS` are read, and of a GIF or multi-page TIFF only the first frame: the frames are never
    counted (PIL walks every page to count them, quadratic in a TIFF's pages). The size in the header is checked
    against ``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`), and a TIFF's strips against :data:`MAX_IMAGE_TILES`,
    before any pixel is decoded (PIL's own process-wide decompression-bomb limit is left as it is: a library call
    must not change it for its caller).
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if not data:
        raise ImageError(f"{source}: empty, not an image")
    try:
        tiles = tiff_tiles(data)
        if tiles > MAX_IMAGE_TILES:
            raise ImageError(
                f"{source}: a TIFF of {tiles} strips or tiles, more than {MAX_IMAGE_TILES}", too_large=True
            )
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:  # the header and the first frame's
                if image.width * image.height > limit:
                    raise ImageError(
                        f"{source}: {image.width}x{image.height} = {image.width * image.height} pixels is more than "
                        f"the limit of {limit}",
                        too_large=True,
                    )
                return image.convert("RGB")  # decodes the frame PIL opened: the first
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{source}: more pixels than the limit of {limit} ({err})", too_large=True) from err
    except UnidentifiedImageError as err:
        raise ImageError(f"{source}: not an image in a format read here ({', '.join(IMAGE_FORMATS)})") from err
    except Exception as err:  # PIL raises many types for broken files: name the source and the reason
        raise ImageError(f"{source}: not a readable image ({type(err).__name__}: {err})") from err


def tiff_tiles(data: bytes) -> int:
    """The number of strips or tiles of a TIFF's first image, read from its first directory by PIL's own directory
    reader, which does not build their decoders; 0 for any other format."""
    if data[:4] not in TiffImagePlugin.PREFIXES:
        return 0
    stream = io.BytesIO(data)
    header = stream.read(8)
    if header[2] == 43:  # BigTIFF: a 16-byte header
        header += stream.read(8)
    directory = TiffImagePlugin.ImageFileDirectory_v2(header)
    stream.seek(directory.next)
    directory.load(stream)
    return max(len(directory.get(tag, ())) for tag in (TiffImagePlugin.STRIPOFFSETS, TiffImagePlugin.TILEOFFSETS))


def eval_transform(info: ServedTask, model: TaskStore) -> Callable[[Image.Image], torch.Tensor]:
    """The task's evaluation transform (saved at training; :func:`~vpt_lightning.sharing.onnx_export.image_transform`);
    checkpoints without one: resize to the backbone's input size, ImageNet mean/std (the training default)."""
    return image_transform(info.eval_transform, model.backbone.data_config()["input_size"][-1])


class EvalTransforms:
    """The tasks' evaluation transforms (:func:`eval_transform`) of a store, each built once per distinct settings:
    tasks prepared alike (thousands, in a task store) share one. ``transforms(info)`` is the task's."""

    def __init__(self, model: TaskStore) -> None:
        self.model = model
        self.built: Dict[str, Callable[[Image.Image], torch.Tensor]] = {}

    def __call__(self, info: ServedTask) -> Callable[[Image.Image], torch.Tensor]:
        key = json.dumps(info.eval_transform, sort_keys=True, default=str)
        if key not in self.built:
            self.built[key] = eval_transform(info, self.model)
        return self.built[key]


def task_transforms(
    model: TaskStore, names: Optional[Iterable[str]] = None
) -> Dict[str, Callable[[Image.Image], torch.Tensor]]:
    """Each task's evaluation transform (of the tasks ``names``, default all), by task name; tasks prepared alike
    share one transform (:class:`EvalTransforms`)."""
    transforms = EvalTransforms(model)
    return {name: transforms(model.entry(name).info) for name in (model.task_names if names is None else names)}


def top_k(probabilities: torch.Tensor, info: ServedTask, k: int) -> List[Dict[str, Any]]:
    """The ``k`` most probable classes of one image of task ``info`` (fewer if it has fewer classes)."""
    return top_classes(probabilities[: info.num_classes], info.class_names, k)


def check_top_k(k: Optional[int]) -> int:
    """``k`` if it is an int from 1 to :data:`MAX_TOP_K` (a JSON number, an option), else :class:`ValueError`."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_TOP_K:
        raise ValueError(f"top_k={k!r} must be an integer from 1 to {MAX_TOP_K}")
    return k


def parse_top_k(text: str) -> int:
    """``top_k`` from a query string: ASCII digits only (``str.isdigit`` also accepts '²' and '٣', which ``int``
    refuses or reads), from 1 to :data:`MAX_TOP_K`; else :class:`ValueError` naming the value."""
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_TOP_K)) or not 1 <= int(text) <= MAX_TOP_K:
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise ValueError(f"top_k={shown!r} must be an integer from 1 to {MAX_TOP_K}, in ASCII digits")
    return int(text)
