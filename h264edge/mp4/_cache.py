# -*- test-case-name: tests.test_mp4 -*-
"""A bounded LRU of L{SeekIndex} values, budgeted in bytes by C{SeekIndex.memory_size}."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from h264edge.mp4._index import SeekIndex


class SeekIndexCache:
    """
    Keeps the most recently used indexes whose sizes add up to at most C{max_bytes}; an index larger
    than the whole budget is not kept at all.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes {max_bytes} must be >= 0")
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[Hashable, SeekIndex] = OrderedDict()

    def get(self, key: Hashable) -> SeekIndex | None:
        index = self._entries.get(key)
        if index is not None:
            self._entries.move_to_end(key)
        return index

    def put(self, key: Hashable, index: SeekIndex) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= old.memory_size
        if index.memory_size > self.max_bytes:
            return
        self._entries[key] = index
        self.size += index.memory_size
        while self.size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.size -= evicted.memory_size

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries
