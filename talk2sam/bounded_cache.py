"""A cache bounded in entries and in bytes, least recently used out first: the predictor's
per-image features, a worker's downloaded images.

Torch-free: it stores whatever it is given, with the size the caller states."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class BoundedCache:
    """Key -> value, bounded in entries and in bytes, least recently used first out.

    Entries put with ``warm=True`` (ahead of use) are *cold* until a plain ``get`` uses them: a
    warm put may evict only cold entries and is dropped when that is not enough, so warming
    many images never evicts the ones in use; a plain put evicts cold entries first, then the
    least recently used. Thread-safe (a reader may list the keys while another thread writes).

    Args:
        max_items: entries at most.
        max_bytes: their bytes at most.
    """

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, tuple[Any, int, bool]] = OrderedDict()  # value, bytes, cold
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str, warm: bool = False) -> Any | None:
        with self._lock:
            if key not in self._items:
                return None
            value, size, cold = self._items.pop(key)
            self._items[key] = (value, size, cold and warm)  # a predict job makes it hot
            return value

    def put(self, key: str, value: Any, nbytes: int, warm: bool = False) -> bool:
        """Store ``value``; returns False when a warm put found no room (nothing stored)."""
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            order = [k for k, (_, _, cold) in self._items.items() if cold]
            if not warm:
                order += [k for k, (_, _, cold) in self._items.items() if not cold]
            doomed, freed = [], 0
            for victim in order:
                if len(self._items) + 1 - len(doomed) <= self.max_items and \
                        self._bytes - freed + nbytes <= self.max_bytes:
                    break
                doomed.append(victim)
                freed += self._items[victim][1]
            fits = len(self._items) + 1 - len(doomed) <= self.max_items and \
                self._bytes - freed + nbytes <= self.max_bytes
            if warm and not fits:
                return False
            for victim in doomed:
                self._bytes -= self._items.pop(victim)[1]
            self._items[key] = (value, nbytes, warm)
            self._bytes += nbytes
            return True

    def keys(self) -> list[str]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes
