"""Image-list datasets and the checks shared by every file-based DataModule (VTAB, FGVC, folders)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..sharing.regular_files import RefusedFileError, read_regular_file

Sample = Tuple[Path, int]
#: an index of a split (a VTAB list, an FGVC split file, a folder's CSV list) larger than this is refused unread: the
#: largest benchmark split's are a few MB, and 1 GiB lists millions of images
MAX_INDEX_FILE_BYTES = 2**30


class DataError(ValueError):
    """Bad data: a missing folder or file, a malformed list line, a label out of range, an unreadable image."""


def require_dir(path: Path, what: str, hint: str = "") -> Path:
    """Return ``path`` if it is a folder, else raise a :class:`DataError` naming it (and how to fix it)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{what} {str(path)!r} does not exist or is not a folder{'; ' + hint if hint else ''}")
    return path


def read_index_text(path: Path, what: str, hint: str = "") -> str:
    """The UTF-8 text of a split's index file: a regular file of at most :data:`MAX_INDEX_FILE_BYTES`, read once. A
    :class:`DataError` names a missing file (``what`` it is, and ``hint``: how to make it), a FIFO, device or folder
    in its place (never opened for reading: a FIFO would wait for a writer, ``/dev/zero`` never ends), one over the
    cap, or one that is not UTF-8."""
    path = Path(path).expanduser()
    if not path.exists():  # a dangling symbolic link too
        raise DataError(f"{what} {str(path)!r} does not exist{' (' + hint + ')' if hint else ''}")
    try:
        data = read_regular_file(path, MAX_INDEX_FILE_BYTES)
        return data.decode("utf-8")
    except RefusedFileError as err:
        raise DataError(f"{what} {err}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {str(path)!r} is not UTF-8 text ({err})") from None


def read_list_file(list_file: Path, image_dir: Path, num_classes: int) -> List[Sample]:
    """Parse a ``relative/path label`` list (one per line) and check it; errors name the file and line."""
    list_file = Path(list_file)
    text = read_index_text(list_file, "list file")
    samples: List[Sample] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?[0-9]+", parts[1]):
            raise DataError(f"{list_file}:{number}: expected 'relative/path label', got {line!r}")
        path, label = image_dir / parts[0], int(parts[1])
        if not 0 <= label < num_classes:
            raise DataError(f"{list_file}:{number}: label {label} is outside [0, {num_classes})")
        if not path.is_file():
            raise DataError(f"{list_file}:{number}: image {str(path)!r} does not exist")
        samples.append((path, label))
    if not samples:
        raise DataError(f"{list_file}: the split is empty")
    return samples


def read_json_object(path: Path, what: str, hint: str = "") -> Dict[str, Any]:
    """Read a JSON file that must hold an object; a :class:`DataError` names the file (``what`` it is) otherwise."""
    path = Path(path).expanduser()
    text = read_index_text(path, what, hint)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{what} {str(path)!r} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise DataError(f"{what} {str(path)!r}: expected a JSON object, got {type(data).__name__}")
    return data


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, raising a :class:`DataError` that names a corrupt or unreadable file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DataError(f"cannot read image {str(path)!r}: {err}") from err


class ImageListDataset(Dataset):
    """``(transform(image), label)`` for a list of ``(path, label)`` samples."""

    def __init__(self, samples: Sequence[Sample], transform: Optional[Callable] = None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_rgb(path)
        return (self.transform(image) if self.transform else image), label


def check_images(samples: Sequence[Sample]) -> List[str]:
    """Decode every image; return one message per unreadable file (an empty list when all are fine)."""
    problems = []
    for path, _ in samples:
        try:
            load_rgb(path)
        except DataError as err:
            problems.append(str(err))
    return problems
