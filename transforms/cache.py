"""A bounded cache: a thread-safe LRU map whose bound is the bytes of its values."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class BoundedCache:
    """A thread-safe LRU map bounded by the bytes of its values (the caller says each value's size).

    A value larger than the whole bound is not kept. ``hits``/``misses`` count :meth:`get` calls. Used for
    decoded references (:func:`transforms.records.prepare_pair`'s ``reference_cache``) and reference
    features (the scorer)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: "OrderedDict[Any, tuple[Any, int]]" = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def get(self, key: Any) -> Any:
        """The value of ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        """Keep ``value`` (``nbytes`` large), evicting the least recently used entries to stay in bound."""
        nbytes = int(nbytes)
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes_used -= old[1]
            while self._entries and self.bytes_used + nbytes > self.max_bytes:
                _, (_, size) = self._entries.popitem(last=False)
                self.bytes_used -= size
                self.evictions += 1
            self._entries[key] = (value, nbytes)
            self.bytes_used += nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes_used = 0
