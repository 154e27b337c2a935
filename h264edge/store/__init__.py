# -*- test-case-name: tests.test_store -*-
"""
The disk store: objects as sparse files cut in fixed slices, JSON sidecars, an LRU index rebuilt
from disk at startup.  See L{h264edge.store._store} for the trust rules and the on-disk layout.
"""

from h264edge.store._sidecar import ObjectMeta
from h264edge.store._store import CachedObject, CacheDirUnusable, SliceStore, StoreError

__all__ = ["CacheDirUnusable", "CachedObject", "ObjectMeta", "SliceStore", "StoreError"]
