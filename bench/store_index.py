"""
Figure 7b helper, run in fresh processes with h264edge importable:

  store_index.py create DIR N    make N small cached objects (4 KiB, one slice each) through the
                                 store API (SliceStore.create / write / commit_slice / close)
  store_index.py rebuild DIR     time SliceStore(DIR).rebuild_steps() to exhaustion in this fresh
                                 process; prints JSON: seconds, objects, steps, longest step (the
                                 longest the reactor would be blocked while the edge serves meanwhile)
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def create(root: str, count: int) -> None:
    from h264edge.store import ObjectMeta, SliceStore

    store = SliceStore(root, max_size=1 << 40, sync=False)
    for _ in store.rebuild_steps():
        pass
    data = os.urandom(4096)
    now = time.time()
    t0 = time.monotonic()
    for i in range(count):
        meta = ObjectMeta(key=f"/objects/{i:07d}.bin", size=len(data), etag=f'"{i:x}"',
                          last_modified=None, content_type="application/octet-stream",
                          fetched_at=now, expires_at=now + 86400)
        obj = store.create(meta)
        obj.write(0, data)
        obj.commit_slice(0)
        obj.close()
    store.close()
    print(json.dumps({"created": count, "seconds": time.monotonic() - t0}))


def rebuild(root: str) -> None:
    import gc

    from h264edge.store import SliceStore
    from h264edge.tap import LOAD_BATCH

    t_import = time.monotonic()
    store = SliceStore(root, max_size=1 << 40)
    steps = 0
    longest = 0.0
    # as the server's IndexLoader does: its step size, no full GC collections while loading
    threshold = gc.get_threshold()
    gc.set_threshold(threshold[0], threshold[1], 1_000_000)
    t0 = last = time.monotonic()
    for _ in store.rebuild_steps(batch=LOAD_BATCH):
        now = time.monotonic()
        longest = max(longest, now - last)
        last = now
        steps += 1
    end = time.monotonic()
    longest = max(longest, end - last)
    print(json.dumps({
        "seconds": end - t0, "objects": len(store), "steps": steps, "longest_step": longest,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "setup_seconds": t0 - t_import,
    }))


if __name__ == "__main__":
    if sys.argv[1] == "create":
        create(sys.argv[2], int(sys.argv[3]))
    else:
        rebuild(sys.argv[2])
