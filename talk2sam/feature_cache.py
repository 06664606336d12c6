"""A per-image cache bounded in entries and in bytes, for predictors that serve many images.

Torch-free: it stores whatever the predictor gives it, with the size the predictor states."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class FeatureCache:
    """Key -> per-image state, bounded in entries and in bytes, least recently used first out.

    Entries put by warm jobs (``warm=True``) are *cold* until a predict job uses them: a warm
    put may evict only cold entries and is dropped when that is not enough, so warming a batch
    never evicts the images annotators are working on; a predict put evicts cold entries
    first, then the least recently used. The heartbeat thread reads the keys while a job writes,
    hence the lock.

    Args:
        max_items: entries at most (the backend's IMAGE_CACHE_SIZE).
        max_bytes: their bytes at most (IMAGE_CACHE_MB).
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
