"""
Sidecars of version 2 (status, header block, cache policy, Vary): what they keep, how version 1
sidecars still load, and that hostile stored header fields never reach a viewer.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from h264edge.store._sidecar import SIDECAR_VERSION, BadSidecar, ObjectMeta, decode_sidecar, encode_sidecar, key_hash
from tests.test_store import StoreTestCase, body, rebuild

META = ObjectMeta(key="/a.mp4", size=40, etag='"e"', last_modified="Mon, 01 Jan 2024 00:00:00 GMT",
                  content_type="video/mp4", fetched_at=1000.0, expires_at=5000.0, status=200,
                  headers=(("Cache-Control", "max-age=4000"), ("Link", "</x>; rel=preload"), ("X-A", "1"),
                           ("X-A", "2")),
                  age=12.5, stale_while_revalidate=30.0, stale_if_error=None, revalidate=True,
                  vary=("accept-encoding",), variants="")
TOKEN = "0123456789abcdef"


def record(meta: ObjectMeta = META) -> dict[str, Any]:
    return json.loads(encode_sidecar(meta, 16, TOKEN, b"\x07", 1500.0))


def decode(raw: dict[str, Any]) -> Any:
    return decode_sidecar(json.dumps(raw).encode(), key_hash(raw["key"]), 16)


class SidecarVersionTests(SynchronousTestCase):
    def test_everything_round_trips(self) -> None:
        self.assertEqual(SIDECAR_VERSION, 2)
        self.assertEqual(decode(record()).meta, META)

    def test_a_vary_marker_round_trips(self) -> None:
        marker = ObjectMeta(key="/v", size=0, etag=None, last_modified=None, content_type="", fetched_at=1.0,
                            expires_at=1.0, status=0, vary=("x-foo",), variants="00112233aabbccdd")
        raw = json.loads(encode_sidecar(marker, 16, TOKEN, b"", 1.0))
        self.assertEqual(decode(raw).meta, marker)

    def test_version_1_loads_as_a_200_with_the_fields_it_kept(self) -> None:
        """Old sidecars are decoded, not dropped: no stored block, age 0, no stale windows, no Vary."""
        raw = record()
        for name in ("status", "headers", "age", "swr", "sie", "revalidate", "vary", "variants"):
            del raw[name]
        raw["version"] = 1
        meta = decode(raw).meta
        self.assertEqual((meta.status, meta.headers, meta.age, meta.vary, meta.revalidate), (200, (), 0.0, (), False))
        self.assertEqual((meta.etag, meta.content_type, meta.expires_at), ('"e"', "video/mp4", 5000.0))

    def test_hostile_stored_fields_are_refused(self) -> None:
        """A sidecar whose block could split an answer (CR/LF/NUL, non-token names) is discarded whole."""
        for fields in ([["X-A", "1\r\nSet-Cookie: evil=1"]], [["X A", "1"]], [["X-A"]], [["X-A", 1]], "x",
                       [["X-A", "\x00"]], [["", "v"]]):
            raw = record()
            raw["headers"] = fields
            self.assertRaises(BadSidecar, decode, raw)

    def test_values_that_cannot_go_on_the_wire_are_refused(self) -> None:
        """
        Every stored value the edge writes into an answer's head must be latin-1 text on one line: a
        character beyond latin-1 (which the answer cannot encode: it was a 500 on every hit of the
        object) or a line break in Content-Type, ETag, Last-Modified or a stored field refuses the
        sidecar whole (the object is a miss).
        """
        for name, value in (("content_type", "vid\u20aco/mp4"), ("etag", '"\u20ac"'), ("last_modified", "a\r\nb"),
                            ("etag", '"e"\nX-A: 1'), ("headers", [["X-A", "\u20ac"]]), ("headers", [["X-A", "\u0100"]])):
            raw = record()
            raw[name] = value
            self.assertRaises(BadSidecar, decode, raw)
        raw = record()
        raw["headers"], raw["content_type"] = [["X-A", "caf\xe9 \xff"]], "text/plain; name=\xe9"  # latin-1: kept
        self.assertEqual(decode(raw).meta.headers, (("X-A", "caf\xe9 \xff"),))

    def test_bad_cache_fields_are_refused(self) -> None:
        for name, value in (("status", 99), ("status", "200"), ("age", -1), ("swr", float("nan")), ("sie", "x"),
                            ("revalidate", 1), ("vary", ["bad name"]), ("vary", "x"), ("variants", "../x")):
            raw = record()
            raw[name] = value
            self.assertRaises(BadSidecar, decode, raw)

    @given(st.dictionaries(st.sampled_from(["status", "headers", "age", "swr", "sie", "revalidate", "vary",
                                            "variants"]),
                           st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                                        lambda inner: st.lists(inner, max_size=3), max_leaves=6)))
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_any_values_decode_or_are_refused_cleanly(self, changes: dict[str, Any]) -> None:
        raw = record()
        raw.update(changes)
        try:
            decode(raw)
        except BadSidecar:
            pass


class StoredVersion1Tests(StoreTestCase):
    def test_a_store_of_version_1_sidecars_rebuilds_and_serves(self) -> None:
        store = self.open_store()
        obj = store.create(META)
        obj.write(0, body(40))
        for index in range(obj.slice_count):
            obj.commit_slice(index)
        store.close()
        [path] = [p for p in self.all_files() if p.endswith(".meta")]
        raw = json.loads(open(path, "rb").read())
        for name in ("status", "headers", "age", "swr", "sie", "revalidate", "vary", "variants"):
            del raw[name]
        raw["version"] = 1
        with open(path, "w") as f:
            json.dump(raw, f)
        again = self.open_store()
        rebuild(again)
        loaded = again.get("/a.mp4")
        assert loaded is not None
        self.assertEqual((loaded.meta.headers, loaded.meta.status), ((), 200))
        self.assertEqual(loaded.read(0, 40), body(40))
