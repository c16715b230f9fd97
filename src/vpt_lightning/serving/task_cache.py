"""The tasks' tensors held in memory, bounded in bytes: least recently used out first, never a task in use.

A :class:`TaskCache` maps a task version (``(name, stamp)``) to what was loaded for it and its size. Adding an entry
evicts least recently used entries until the bytes fit the budget; an entry acquired by a batch in flight
(:meth:`TaskCache.acquire` until :meth:`TaskCache.release`) or pinned by name is never evicted. When even that is
not enough (the batch's own tasks and the pinned ones fill the budget), the new entry is not kept: its caller uses
it for the batch and drops it, so the bytes held never pass the budget. Not thread-safe: the store locks around it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Iterable, List, Optional, Set, Tuple

#: a cached task version: ``(task name, version stamp)``
Key = Tuple[str, Hashable]
#: the units :func:`parse_bytes` reads: decimal (kB, MB, GB, TB) and binary (KiB, MiB, GiB, TiB)
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_bytes(text: str) -> int:
    """A size such as ``2GiB``, ``500MB``, ``1.5 GB`` or ``1000000`` in bytes (``--cache-bytes``)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in UNITS:
        raise ValueError(
            f"{text!r} is not a size: a number of bytes with an optional unit (kB, MB, GB, TB, KiB, MiB, GiB, TiB), "
            "e.g. 2GiB"
        )
    return int(float(match.group(1)) * UNITS[unit])


@dataclass
class _Slot:
    value: Any
    nbytes: int
    users: int = 0
    retired: bool = False  # dropped from the index while in use: removed at its last release


class TaskCache:
    """Byte-bounded LRU of loaded task versions (``budget`` bytes; ``None``: unbounded)."""

    def __init__(self, budget: Optional[int] = None) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"cache budget {budget} bytes must be >= 0")
        self.budget = budget
        self.used = 0
        self.pinned: Set[str] = set()
        self._slots: "OrderedDict[Key, _Slot]" = OrderedDict()
        self.evictions = 0
        self.changes = 0  # counts entries added and removed

    def __contains__(self, key: Key) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def keys(self) -> List[Key]:
        return list(self._slots)

    def names(self) -> Set[str]:
        return {name for name, _ in self._slots}

    def get(self, key: Key) -> Optional[Any]:
        """The value held for ``key`` (now the most recently used), or ``None``."""
        slot = self._slots.get(key)
        if slot is None or slot.retired:
            return None
        self._slots.move_to_end(key)
        return slot.value

    def nbytes(self, key: Key) -> int:
        return self._slots[key].nbytes

    def _evictable(self, key: Key, slot: _Slot) -> bool:
        return slot.users == 0 and key[0] not in self.pinned

    def room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would fit after evicting every evictable entry."""
        if self.budget is None:
            return True
        held = sum(s.nbytes for k, s in self._slots.items() if not self._evictable(k, s))
        return held + nbytes <= self.budget

    def put(self, key: Key, value: Any, nbytes: int) -> bool:
        """Hold ``value`` for ``key``, evicting least recently used entries to make room; ``False`` (nothing
        evicted, nothing kept) when it cannot fit beside the entries in use and the pinned ones."""
        if key in self._slots:  # already held (loaded twice meanwhile): keep the first
            return True
        if not self.room(nbytes):
            return False
        if self.budget is not None:
            for old in list(self._slots):
                if self.used + nbytes <= self.budget:
                    break
                if self._evictable(old, self._slots[old]):
                    self._remove(old)
                    self.evictions += 1
        self._slots[key] = _Slot(value, nbytes)
        self.used += nbytes
        self.changes += 1
        return True

    def acquire(self, key: Key) -> None:
        """Mark ``key`` in use (by a batch in flight): it is not evicted until :meth:`release`."""
        self._slots[key].users += 1

    def release(self, key: Key) -> None:
        slot = self._slots.get(key)
        if slot is None:
            return
        slot.users -= 1
        if slot.users <= 0 and slot.retired:
            self._remove(key)

    def discard(self, key: Key) -> None:
        """Drop ``key`` (a version the index no longer has): now if unused, else at its last release."""
        slot = self._slots.get(key)
        if slot is None:
            return
        if slot.users > 0:
            slot.retired = True
        else:
            self._remove(key)

    def discard_name(self, name: str, keep: Optional[Key] = None) -> None:
        """Drop every version of ``name`` but ``keep``."""
        for key in [k for k in self._slots if k[0] == name and k != keep]:
            self.discard(key)

    def _remove(self, key: Key) -> None:
        slot = self._slots.pop(key)
        self.used -= slot.nbytes
        self.changes += 1

    def items(self) -> Iterable[Tuple[Key, Any]]:
        return [(k, s.value) for k, s in self._slots.items()]

    def stats(self) -> Dict[str, Any]:
        """What ``/tasks`` reports: bytes held and budget, entries, entries in use, evictions so far."""
        return {
            "bytes": self.used,
            "budget": self.budget,
            "entries": len(self._slots),
            "in_use": sum(1 for s in self._slots.values() if s.users > 0),
            "evictions": self.evictions,
        }
