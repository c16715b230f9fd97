"""TFDS's order of the examples of a split, computed without TensorFlow.

TFDS writes every split sorted by the 128-bit md5 of the split name (the salt) followed by the example's key, the
key ``_generate_examples`` yields (``tensorflow_datasets/core/hashing.py``: ``Hasher(salt=split).hash_key(key)``;
int keys are hashed as their decimal text, str keys as UTF-8 with ``\\`` turned into ``/``, bytes as they are).
A slice such as ``train[45000:45200]`` reads that sorted order, so rebuilding the keys from the source files gives
the very examples of every VTAB-1k split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

Key = Union[int, str, bytes]


def _key_bytes(key: Key) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"a TFDS example key is an int, str or bytes, got {key!r} ({type(key).__name__})")
    return (str(key) if isinstance(key, int) else key.replace("\\", "/")).encode("utf-8")


def tfds_sort_key(split: str, key: Key) -> int:
    """TFDS's sort key of example ``key`` in split ``split``: ``int(md5(split + key))``."""
    return int(hashlib.md5(split.encode("utf-8") + _key_bytes(key)).hexdigest(), 16)


def tfds_order(split: str, keys: Sequence[Key]) -> List[int]:
    """Indices into ``keys`` in the order TFDS stores split ``split``; keys must be distinct, as TFDS requires."""
    hashes = [tfds_sort_key(split, key) for key in keys]
    if len(set(hashes)) != len(hashes):
        seen = {}
        for key, value in zip(keys, hashes):
            if value in seen:
                raise ValueError(
                    f"split {split!r}: the key {key!r} appears twice (also {seen[value]!r}); TFDS keys are unique"
                )
            seen[value] = key
    return sorted(range(len(keys)), key=hashes.__getitem__)


@dataclass(frozen=True)
class Slice:
    """A VTAB split as a slice of a TFDS split, e.g. ``train[45000:45200]``.

    The start is ``start`` plus, for each percentage in ``start_pct``, ``pct * size // 100`` (VTAB's own integer
    arithmetic, e.g. EuroSAT's test ``train[60% + 20%:]``); ``length=None`` runs to the end of the split.
    """

    split: str
    start: int = 0
    length: Optional[int] = None
    start_pct: Tuple[int, ...] = ()

    def bounds(self, size: int) -> Tuple[int, int]:
        """``(start, stop)`` in a split of ``size`` examples; an error if the split is too small for it."""
        start = self.start + sum(pct * size // 100 for pct in self.start_pct)
        stop = size if self.length is None else start + self.length
        if stop > size or start >= stop:
            raise ValueError(
                f"{self}: the source's {self.split!r} split has {size} examples, too few for [{start}:{stop}]"
            )
        return start, stop

    def __str__(self) -> str:
        """TFDS-like text: ``train[:800]``, ``train[90%:+200]`` (200 from 90%), ``train[60%+20%:]``."""
        parts = [f"{p}%" for p in self.start_pct] + ([str(self.start)] if self.start else [])
        stop = "" if self.length is None else f"+{self.length}" if self.start_pct else str(self.start + self.length)
        return f"{self.split}[{'+'.join(parts)}:{stop}]" if parts or stop else self.split
