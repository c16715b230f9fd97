"""One split of a dataset's source files as TFDS builds it: per example its TFDS key, VTAB label and image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

from PIL import Image

from ..datasets import DataError
from .tfds_order import Key


@dataclass(frozen=True)
class SourceSplit:
    """The examples of one TFDS split, in the order the source lists them.

    Attributes:
        keys: the key TFDS's ``_generate_examples`` yields for each example (its order is the md5 of split + key).
        labels: VTAB's label of each example (after the task's label rule).
        names: a file name per example (its path in the source, or ``<split>_<index>.png`` for arrays), unique.
        files: the image file of each example, copied as it is; ``None`` for arrays, which ``decode`` turns into
            images saved as PNG.
        decode: example index -> image (saved as PNG, or as JPEG of quality 72 where its name ends in ``.jpg``) or
            the encoded file's bytes; used where ``files`` is ``None``.
        prefetch: optional; called with the indices about to be decoded (array sources read them in one pass).
    """

    keys: Sequence[Key]
    labels: Sequence[int]
    names: Sequence[str]
    files: Optional[Sequence[Path]] = None
    decode: Optional[Callable[[int], Union[Image.Image, bytes]]] = None
    prefetch: Optional[Callable[[Sequence[int]], None]] = None

    def __post_init__(self) -> None:
        if not len(self.keys) == len(self.labels) == len(self.names):
            raise ValueError(
                f"{len(self.keys)} keys, {len(self.labels)} labels and {len(self.names)} names differ in number"
            )
        if (self.files is None) == (self.decode is None):
            raise ValueError("a SourceSplit has either image files or a decode function")

    def __len__(self) -> int:
        return len(self.keys)


def array_names(split: str, count: int) -> List[str]:
    """File names of the examples of an array source: ``<split>_<index>.png`` (TFDS's ``id`` style)."""
    return [f"{split}_{i:05d}.png" for i in range(count)]


def require_file(path: Path, what: str, hint: str) -> Path:
    """``path`` if it is a file, else a :class:`DataError` naming it, what it is and where it comes from."""
    if not Path(path).is_file():
        raise DataError(f"{what} {str(path)!r} does not exist ({hint})")
    return Path(path)
