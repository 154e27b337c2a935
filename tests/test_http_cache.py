"""
The edge as a shared HTTP cache (issue 9), end to end: a real edge in front of a scripted origin on
127.0.0.1.  One test per rule; each asserts what the viewer got and what the origin saw, and names
the RFC section it follows.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SkipTest

from h264edge.httpcache import format_http_date
from h264edge.testing import Answer, ScriptedOrigin, ScriptedRequest, listen_scripted, represent
from tests.edgekit import SLICE, ScriptedEdgeTestCase, header, random_bytes

DATA = random_bytes(3 * SLICE + 321, seed=31)
ETAG = '"d1"'
LONG_AGO = "Sun, 06 Nov 1994 08:49:37 GMT"


def headers_of(response: Any, name: str) -> list[str]:
    return [v.decode("latin-1") if isinstance(v, bytes) else v for v in response.headers.getRawHeaders(name) or []]


class HeaderBlockTests(ScriptedEdgeTestCase):
    """Issue 9.1: the origin's header block is stored with the object and replayed."""

    ORIGIN_FIELDS = [
        ("Content-Type", "video/mp4"),
        ("Cache-Control", "public, max-age=600"),
        ("Access-Control-Allow-Origin", "*"),
        ("Access-Control-Expose-Headers", "Content-Length, Content-Range"),
        ("Content-Disposition", 'attachment; filename="clip.mp4"'),
        ("Link", "</poster.jpg>; rel=preload; as=image"),
        ("X-Custom", "one"),
        ("X-Custom", "two"),
        ("Connection", "X-Hop"),
        ("X-Hop", "hop-by-hop"),
        ("Keep-Alive", "timeout=5"),
        ("Content-MD5", "whole-body-digest"),
        ("Date", format_http_date(time.time())),
        ("Last-Modified", LONG_AGO),
    ]

    def setUp(self) -> None:
        super().setUp()
        self.scripted.serve("/v.mp4", DATA, self.ORIGIN_FIELDS, etag=ETAG)

    def assert_block(self, response: Any) -> None:
        for name in ("Cache-Control", "Access-Control-Allow-Origin", "Access-Control-Expose-Headers",
                     "Content-Disposition", "Link", "Date", "Last-Modified", "ETag", "Content-Type"):
            expected = [value for key, value in self.ORIGIN_FIELDS if key == name] or [ETAG]
            self.assertEqual(headers_of(response, name), expected, name)
        self.assertEqual(headers_of(response, "X-Custom"), ["one", "two"])
        for name in ("X-Hop", "Keep-Alive"):
            self.assertEqual(headers_of(response, name), [], name)
        self.assertEqual(header(response, "Via"), "1.1 edge.test")

    async def test_miss_and_hit_replay_the_origins_fields(self) -> None:
        """RFC 9111 §3.1, §4 and RFC 9110 §7.6.1: end-to-end fields stored and sent; hop-by-hop ones not."""
        miss, body = await self.get("/v.mp4")
        hit, body2 = await self.get("/v.mp4")
        self.assertEqual((body, body2), (DATA, DATA))
        self.assertEqual([header(miss, "X-Cache"), header(hit, "X-Cache")], ["MISS", "HIT"])
        for response in (miss, hit):
            self.assert_block(response)
            self.assertEqual(header(response, "Content-MD5"), "whole-body-digest")
        self.assertIsNotNone(header(hit, "Age"))
        self.assertEqual(self.scripted.requests, 1)

    async def test_a_range_has_its_own_framing_and_no_whole_body_digest(self) -> None:
        """RFC 9110 §14.4, §15.3.7: a 206 carries its Content-Range and Content-Length, the rest replayed."""
        await self.get("/v.mp4")
        response, body = await self.get("/v.mp4", {"Range": "bytes=100-199"})
        self.assertEqual((response.code, body), (206, DATA[100:200]))
        self.assert_block(response)
        self.assertEqual(header(response, "Content-Range"), f"bytes 100-199/{len(DATA)}")
        self.assertEqual(response.length, 100)
        self.assertIsNone(header(response, "Content-MD5"))
        self.assertEqual(self.scripted.requests, 1)

    async def test_the_block_survives_a_restart(self) -> None:
        """RFC 9111 §3: the stored response, header block included, is what a restarted edge serves."""
        await self.get("/v.mp4")
        await self.restart_edge()
        response, body = await self.get("/v.mp4")
        self.assertEqual((header(response, "X-Cache"), body), ("HIT", DATA))
        self.assert_block(response)
        self.assertEqual(self.scripted.requests, 1)

    async def test_a_header_block_over_the_cap_is_502(self) -> None:
        """The edge's limit: a header block over 64 KiB is not stored or relayed (502), nothing is cached."""
        self.scripted.serve("/big-head.bin", DATA, [(f"X-Filler-{i}", "v" * 1000) for i in range(70)])
        response, body = await self.get("/big-head.bin")
        self.assertEqual(response.code, 502)
        self.assertIn(b"header block", body)
        self.assertIsNone(self.store.get("/big-head.bin"))


class AgeAndViaTests(ScriptedEdgeTestCase):
    async def test_stored_date_is_kept_and_age_counts_the_origins(self) -> None:
        """RFC 9111 §4.2.3, §5.1 and RFC 9110 §6.6.1: the origin's Date is kept, Age adds its Age."""
        fields = [("Cache-Control", "max-age=3600"), ("Age", "30"), ("Date", "Tue, 14 Nov 2023 22:13:20 GMT")]
        self.scripted.serve("/a.bin", DATA, fields)
        miss, _ = await self.get("/a.bin")
        hit, _ = await self.get("/a.bin")
        for response in (miss, hit):
            self.assertEqual(header(response, "Date"), "Tue, 14 Nov 2023 22:13:20 GMT")
        # the Date is long past: the apparent age rules (RFC 9111 §4.2.3), so the answer is stale at once
        self.assertGreater(int(header(miss, "Age") or 0), 3600)

    async def test_the_origins_age_makes_an_answer_stale(self) -> None:
        """RFC 9111 §4.2.3: `Age: 7200` with `max-age=3600` is stale on arrival: the next request revalidates."""
        self.scripted.serve("/a.bin", DATA, [("Cache-Control", "max-age=3600"), ("Age", "7200")])
        first, _ = await self.get("/a.bin")
        second, body = await self.get("/a.bin")
        self.assertEqual(header(first, "Age"), "7200")
        self.assertEqual((header(second, "X-Cache"), body), ("REVALIDATED", DATA))
        self.assertEqual([r.header("if-none-match") for r in self.scripted.log], [None, '"' + _tag(DATA) + '"'])

    async def test_age_on_a_hit_and_via_on_every_answer(self) -> None:
        """RFC 9111 §5.1, RFC 9110 §7.6.3: a HIT says its age; every answer and request names this edge in Via."""
        self.scripted.serve("/a.bin", DATA, [("Cache-Control", "max-age=600"), ("Via", "1.1 shield")])
        miss, _ = await self.get("/a.bin", {"Via": "1.0 corp-proxy"})
        hit, _ = await self.get("/a.bin")
        self.assertIsNone(header(miss, "Age"))  # fetched for this request, with no Age from the origin
        self.assertEqual(header(hit, "Age"), "0")
        self.assertEqual([header(miss, "Via"), header(hit, "Via")], ["1.1 shield, 1.1 edge.test"] * 2)
        self.assertEqual(self.scripted.log[0].header("via"), "1.0 corp-proxy, 1.1 edge.test")


class RevalidationTests(ScriptedEdgeTestCase):
    async def test_a_304_updates_the_stored_fields(self) -> None:
        """RFC 9111 §3.2, §4.3.4: the 304's fields replace the stored ones; the body is not fetched again."""
        version = ["1", "max-age=0"]

        def handler(request: ScriptedRequest) -> Answer:
            return represent(request, DATA, [("Cache-Control", version[1]), ("X-Version", version[0])], ETAG)

        self.scripted.route("/r.bin", handler)
        first, _ = await self.get("/r.bin")
        version[:] = ["2", "max-age=600"]
        second, body = await self.get("/r.bin")
        third, _ = await self.get("/r.bin")
        self.assertEqual([header(r, "X-Version") for r in (first, second, third)], ["1", "2", "2"])
        self.assertEqual([header(r, "X-Cache") for r in (first, second, third)], ["MISS", "REVALIDATED", "HIT"])
        self.assertEqual(body, DATA)
        self.assertEqual([r.header("if-none-match") for r in self.scripted.log], [None, ETAG])
        await self.restart_edge()
        fourth, _ = await self.get("/r.bin")
        self.assertEqual((header(fourth, "X-Cache"), header(fourth, "X-Version")), ("HIT", "2"))
        self.assertEqual(self.scripted.requests, 2)

    async def test_if_none_match_with_a_quoted_comma(self) -> None:
        """RFC 9110 §8.8.3, §13.1.2: a comma inside an entity-tag belongs to it; `"a,b"` matches `"a,b"`."""
        self.scripted.serve("/q.bin", DATA, [("Cache-Control", "max-age=600")], etag='"a,b"')
        await self.get("/q.bin")
        response, body = await self.get("/q.bin", {"If-None-Match": '"x", "a,b"'})
        self.assertEqual((response.code, body), (304, b""))
        self.assertEqual(header(response, "Cache-Control"), "max-age=600")  # RFC 9110 §15.4.5
        response, _ = await self.get("/q.bin", {"If-None-Match": '"a"'})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.scripted.requests, 1)


class RequestForwardingTests(ScriptedEdgeTestCase):
    async def test_end_to_end_request_fields_reach_the_origin(self) -> None:
        """RFC 9110 §7.6: the viewer's end-to-end fields go on (not hop-by-hop ones, not its Range/If-*)."""
        self.scripted.serve("/f.bin", DATA, [("Cache-Control", "max-age=600")])
        await self.get("/f.bin", {
            "User-Agent": "player/1", "Accept": "video/*", "Accept-Language": "fr", "X-Session": "s1",
            "Connection": "X-Secret", "X-Secret": "no", "If-None-Match": '"old"', "Range": "bytes=5-9",
            "Accept-Encoding": "gzip", "X-Forwarded-For": "203.0.113.9"})
        seen = self.scripted.log[0]
        for name, value in (("user-agent", "player/1"), ("accept", "video/*"), ("accept-language", "fr"),
                            ("x-session", "s1"), ("x-forwarded-for", "203.0.113.9, 127.0.0.1"),
                            ("via", "1.1 edge.test"), ("accept-encoding", "identity"),
                            ("range", f"bytes=0-{SLICE - 1}")):
            self.assertEqual(seen.header(name), value, name)
        for name in ("x-secret", "if-none-match"):
            self.assertIsNone(seen.header(name), name)

    async def test_slice_fetches_carry_the_fields_of_the_request_they_serve(self) -> None:
        """The fill's ranged requests for a viewer carry that viewer's fields, and stay identity."""
        self.scripted.serve("/f.bin", DATA, [("Cache-Control", "max-age=600")])
        await self.get("/f.bin", {"Range": "bytes=0-9", "User-Agent": "first"})
        response, body = await self.get("/f.bin", {"User-Agent": "second"})
        self.assertEqual((header(response, "X-Cache"), body), ("PARTIAL", DATA))
        self.assertEqual([(r.header("range"), r.header("user-agent"), r.header("accept-encoding"))
                          for r in self.scripted.log],
                         [(f"bytes=0-{SLICE - 1}", "first", "identity"),
                          (f"bytes={SLICE}-{len(DATA) - 1}", "second", "identity")])


def _tag(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]


PAGE = b"<html>not here</html>\n"


class StatusTests(ScriptedEdgeTestCase):
    """Issue 9.2: every status is relayed with its body and headers, and stored when RFC 9111 §3 allows."""

    async def test_301_is_relayed_with_its_location_and_stored(self) -> None:
        """RFC 9110 §15.4.2, RFC 9111 §4.2.2: a 301 is heuristically cacheable; Location and body kept."""
        self.scripted.route("/old.mp4", lambda r: Answer(301, [("Location", "/new.mp4"), ("Content-Type", "text/html"),
                                                               ("Last-Modified", LONG_AGO)], b"moved"))
        first, body = await self.get("/old.mp4")
        second, body2 = await self.get("/old.mp4")
        for response in (first, second):
            self.assertEqual((response.code, header(response, "Location")), (301, "/new.mp4"))
            self.assertEqual(header(response, "Content-Type"), "text/html")
        self.assertEqual((body, body2), (b"moved", b"moved"))
        self.assertEqual([header(first, "X-Cache"), header(second, "X-Cache")], ["MISS", "HIT"])
        self.assertEqual(self.scripted.requests, 1)

    async def test_404_page_is_relayed_and_stored_with_explicit_freshness(self) -> None:
        """RFC 9111 §3, §4.2.1: a 404 with max-age is stored; its page is the body (chunked, read whole)."""
        self.scripted.route("/gone.mp4", lambda r: Answer(404, [("Cache-Control", "max-age=60"),
                                                                ("Transfer-Encoding", "chunked")],
                                                          f"{len(PAGE):x}\r\n".encode() + PAGE + b"\r\n0\r\n\r\n"))
        first, body = await self.get("/gone.mp4")
        second, body2 = await self.get("/gone.mp4?start=5")  # a seek of a 404 is the 404
        third, body3 = await self.get("/gone.mp4", {"Range": "bytes=0-3"})  # Range does not apply
        for response, got in ((first, body), (second, body2), (third, body3)):
            self.assertEqual((response.code, got), (404, PAGE))
            self.assertEqual(header(response, "Cache-Control"), "max-age=60")
        self.assertEqual([header(r, "X-Cache") for r in (first, second, third)], ["MISS", "HIT", "HIT"])
        self.assertIsNone(header(first, "Content-Type"))  # the origin sent none: none is made up
        self.assertEqual(self.scripted.requests, 1)

    async def test_302_without_freshness_is_relayed_not_stored(self) -> None:
        """RFC 9111 §3: a 302 is not heuristically cacheable: without explicit freshness it is not stored."""
        self.scripted.route("/tmp.mp4", lambda r: Answer(302, [("Location", "/x.mp4")], b""))
        for _ in range(2):
            response, _ = await self.get("/tmp.mp4")
            self.assertEqual((response.code, header(response, "Location")), (302, "/x.mp4"))
            self.assertEqual(header(response, "X-Cache"), "BYPASS")
        self.assertEqual(self.scripted.requests, 2)

    async def test_a_5xx_from_the_only_origin_is_relayed_after_one_request(self) -> None:
        """RFC 9110 §9.2.2 (the edge's rule): each origin is asked once per answer; its 5xx is the answer."""
        self.scripted.route("/e.bin", lambda r: Answer(503, [("Retry-After", "30"), ("Content-Type", "text/plain")],
                                                       b"maintenance\n"))
        response, body = await self.get("/e.bin")
        self.assertEqual((response.code, body), (503, b"maintenance\n"))
        self.assertEqual((header(response, "Retry-After"), header(response, "X-Cache")), ("30", "BYPASS"))
        self.assertEqual(self.scripted.requests, 1)
        self.assertIsNone(self.store.get("/e.bin"))

    async def test_a_5xx_fails_over_and_the_last_one_is_relayed(self) -> None:
        """Failover for idempotent requests: each origin once; every one failing, the last answer is relayed."""
        second = ScriptedOrigin()
        port, url = listen_scripted(second)
        self.addCleanup(port.stopListening)
        await self.restart_edge(origins=[self.scripted_url, url])
        self.scripted.route("/e.bin", lambda r: Answer(500, [], b"first\n"))
        second.route("/e.bin", lambda r: Answer(502, [], b"second\n"))
        response, body = await self.get("/e.bin")
        self.assertEqual((response.code, body), (502, b"second\n"))
        self.assertEqual((self.scripted.requests, second.requests), (1, 1))

    async def test_stale_if_error_serves_the_stored_answer_for_a_5xx(self) -> None:
        """RFC 5861 §4: within stale-if-error a stored answer stands in for an origin's 5xx; past it, the 5xx."""
        state = {"fail": False, "cc": "max-age=0, stale-if-error=600"}

        def handler(request: ScriptedRequest) -> Answer:
            if state["fail"]:
                return Answer(503, [], b"down\n")
            return represent(request, DATA, [("Cache-Control", str(state["cc"]))], ETAG)

        self.scripted.route("/s.bin", handler)
        self.scripted.route("/t.bin", handler)
        await self.get("/s.bin")
        state["fail"] = True
        response, body = await self.get("/s.bin")
        self.assertEqual((response.code, header(response, "X-Cache"), body), (200, "STALE", DATA))
        state.update(fail=False, cc="max-age=0, stale-if-error=0")
        await self.get("/t.bin")
        await self.settle(1.1)
        state["fail"] = True
        response, body = await self.get("/t.bin")
        self.assertEqual((response.code, body), (503, b"down\n"))
        self.assertEqual(len(self.scripted.log), 4)

    async def test_must_revalidate_is_never_served_stale(self) -> None:
        """RFC 9111 §5.2.2.2: a must-revalidate answer that cannot be revalidated is a 504, not stale."""
        self.scripted.serve("/m.bin", DATA, [("Cache-Control", "max-age=0, must-revalidate")])
        self.scripted.serve("/n.bin", DATA, [("Cache-Control", "max-age=0")])
        await self.get("/m.bin")
        await self.get("/n.bin")
        self.scripted.routes.clear()
        self.scripted.route("/m.bin", lambda r: Answer(200, raw=b"HTTP/1.1 200 OK\r\nContent-Le", close=True))
        self.scripted.route("/n.bin", lambda r: Answer(200, raw=b"HTTP/1.1 200 OK\r\nContent-Le", close=True))
        must, _ = await self.get("/m.bin")
        may, body = await self.get("/n.bin")
        self.assertEqual(must.code, 504)
        self.assertEqual((may.code, header(may, "X-Cache"), body), (200, "STALE", DATA))


class OddOriginTests(ScriptedEdgeTestCase):
    """Issue 9.6: an origin that breaks HTTP's framing gets a clean 502 and the next origin, never a 500."""

    BROKEN = {
        "cut headers": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Partial",
        "unknown transfer coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked2\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "two Content-Lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "not HTTP": b"SSH-2.0-OpenSSH_9.2\r\n",
        "bad status": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
    }

    async def test_framing_errors_are_502_and_fail_over(self) -> None:
        second = ScriptedOrigin()
        port, url = listen_scripted(second)
        self.addCleanup(port.stopListening)
        second.serve("/x.bin", DATA)
        for what, raw in self.BROKEN.items():
            self.scripted.route("/x.bin", lambda r, raw=raw: Answer(raw=raw, close=True))
            await self.restart_edge()
            self.store.remove("/x.bin")
            response, body = await self.get("/x.bin")
            self.assertEqual(response.code, 502, what)
            self.assertEqual(header(response, "Content-Type"), "text/plain; charset=utf-8", what)
            await self.restart_edge(origins=[self.scripted_url, url])
            self.store.remove("/x.bin")
            response, body = await self.get("/x.bin")
            self.assertEqual((response.code, body), (200, DATA), what)
        self.assertEqual(second.requests, len(self.BROKEN))
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_early_hints_are_passed_over(self) -> None:
        """RFC 9110 §15.2: a 1xx the edge cannot forward (see the README) is skipped; the final answer counts."""
        self.scripted.route("/h.bin", lambda r: attrs_evolve(represent(r, DATA, [("Cache-Control", "max-age=60")]),
                                                             interim=[("103 Early Hints", [("Link", "</a.js>")])]))
        response, body = await self.get("/h.bin")
        self.assertEqual((response.code, body), (200, DATA))
        self.assertEqual(self.scripted.requests, 1)


def attrs_evolve(answer: Answer, **changes: Any) -> Answer:
    import attrs

    return attrs.evolve(answer, **changes)


def echo_variant(request: ScriptedRequest) -> Answer:
    """An origin whose answer depends on the request's X-Foo (and says so with Vary)."""
    body = f"variant {request.header('x-foo')}".encode() * 1000
    return represent(request, body, [("Cache-Control", "max-age=600"), ("Vary", "X-Foo")],
                     '"' + _tag(body) + '"')


class VaryTests(ScriptedEdgeTestCase):
    """Issue 9.3: secondary keys (RFC 9111 §4.1)."""

    async def test_each_variant_is_stored_apart(self) -> None:
        """RFC 9111 §4.1: a stored answer is used only for requests whose Vary'd fields match."""
        self.scripted.route("/v.json", echo_variant)
        one, body1 = await self.get("/v.json", {"X-Foo": "1"})
        two, body2 = await self.get("/v.json", {"X-Foo": "2"})
        again, body3 = await self.get("/v.json", {"X-Foo": "1"})
        none, body4 = await self.get("/v.json")
        self.assertEqual((body1[:9], body2[:9], body3[:9], body4[:12]), (b"variant 1", b"variant 2", b"variant 1",
                                                                          b"variant None"))
        self.assertEqual([header(r, "X-Cache") for r in (one, two, again, none)], ["MISS", "MISS", "HIT", "MISS"])
        self.assertEqual(header(again, "Vary"), "X-Foo")
        self.assertEqual([r.header("x-foo") for r in self.scripted.log], ["1", "2", None])

    async def test_normalised_fields_select_the_same_variant(self) -> None:
        """RFC 9111 §4.1: field lines combined and whitespace dropped before comparing."""
        self.scripted.route("/v.json", lambda r: represent(r, b"x" * 100, [("Cache-Control", "max-age=600"),
                                                                            ("Vary", "Accept-Language")]))
        await self.get("/v.json", {"Accept-Language": "fr,  en"})
        response, _ = await self.get("/v.json", {"Accept-Language": "FR, EN"})
        self.assertEqual(header(response, "X-Cache"), "HIT")
        response, _ = await self.get("/v.json", {"Accept-Language": "en, fr"})  # another order: another variant
        self.assertEqual(header(response, "X-Cache"), "MISS")
        self.assertEqual(self.scripted.requests, 2)

    async def test_vary_star_is_never_reused(self) -> None:
        """RFC 9111 §4.1: Vary: * always fails to match."""
        self.scripted.serve("/s.json", b"star", [("Cache-Control", "max-age=600"), ("Vary", "*")])
        for _ in range(2):
            response, body = await self.get("/s.json")
            self.assertEqual((body, header(response, "X-Cache")), (b"star", "BYPASS"))
        self.assertEqual(self.scripted.requests, 2)

    async def test_a_variant_selected_by_huge_fields_is_not_stored(self) -> None:
        """The edge's limit: selecting fields over 4 KiB would make a key of that size per value: not stored."""
        self.scripted.route("/v.json", echo_variant)
        for _ in range(2):
            response, body = await self.get("/v.json", {"X-Foo": "f" * 5000})
            self.assertEqual((header(response, "X-Cache"), body[:9]), ("BYPASS", b"variant f"))
        self.assertEqual(self.scripted.requests, 2)

    async def test_variants_survive_a_restart_and_are_purged_together(self) -> None:
        """A Vary'd URL is a set of variants under one key: kept across restarts, purged at once."""
        self.scripted.route("/v.json", echo_variant)
        await self.get("/v.json", {"X-Foo": "1"})
        await self.get("/v.json", {"X-Foo": "2"})
        await self.restart_edge()
        for foo in ("1", "2"):
            response, body = await self.get("/v.json", {"X-Foo": foo})
            self.assertEqual((header(response, "X-Cache"), body[:9]), ("HIT", f"variant {foo}".encode()))
        response, _ = await self.get("/v.json", method="PURGE")
        self.assertEqual(response.code, 200)
        self.assertEqual([key for key in self.store.keys_lru() if key.startswith("/v.json")], [])
        for foo in ("1", "2"):
            response, _ = await self.get("/v.json", {"X-Foo": foo})
            self.assertEqual(header(response, "X-Cache"), "MISS")
        self.assertEqual(self.scripted.requests, 4)

    async def test_concurrent_viewers_of_other_variants_never_share_an_answer(self) -> None:
        """One origin contact is shared only by requests it answers: another variant asks for its own."""
        self.scripted.route("/v.json", lambda r: attrs_evolve(echo_variant(r), delay=0.1))
        results = await defer.gatherResults([defer.Deferred.fromCoroutine(self.get("/v.json", {"X-Foo": foo}))
                                             for foo in ("1", "2", "1")])
        self.assertEqual([body[:9] for _, body in results], [b"variant 1", b"variant 2", b"variant 1"])
        self.assertEqual(sorted(r.header("x-foo") or "" for r in self.scripted.log), ["1", "2"])


class FreshnessRuleTests(ScriptedEdgeTestCase):
    """Issue 9.4."""

    async def test_cdn_cache_control_beats_cache_control(self) -> None:
        """RFC 9213 §2.1: CDN-Cache-Control governs the edge; Cache-Control still reaches the viewer."""
        self.scripted.serve("/c.bin", DATA, [("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=600")])
        await self.get("/c.bin")
        response, body = await self.get("/c.bin")
        self.assertEqual((header(response, "X-Cache"), body), ("HIT", DATA))
        self.assertEqual(header(response, "Cache-Control"), "no-store")
        self.assertEqual(self.scripted.requests, 1)

    async def test_heuristic_freshness_from_last_modified(self) -> None:
        """RFC 9111 §4.2.2: no explicit freshness: 10% of the time since Last-Modified (capped)."""
        self.scripted.serve("/h.bin", DATA, [("Last-Modified", format_http_date(time.time() - 1000))])
        self.scripted.serve("/old.bin", DATA, [("Last-Modified", LONG_AGO)])
        for path in ("/h.bin", "/old.bin"):
            await self.get(path)
            response, _ = await self.get(path)
            self.assertEqual(header(response, "X-Cache"), "HIT")
        lifetimes = []
        for key in ("/h.bin", "/old.bin"):
            obj = self.store.get(key)
            assert obj is not None
            lifetimes.append(obj.meta.expires_at - obj.meta.fetched_at)
        self.assertLess(abs(lifetimes[0] - 100), 2)  # a tenth of 1000 s
        self.assertLess(abs(lifetimes[1] - 3600), 2)  # the cap: --default-ttl
        self.assertEqual(self.scripted.requests, 2)

    async def test_dates_in_year_0000_are_invalid_dates_not_errors(self) -> None:
        """
        RFC 9111 §4.2 and §5.3: an origin's Date, Expires or Last-Modified that names no real day is an
        invalid date (an Expires in the past: stale), never a 500.  Year 0000 follows the HTTP-date
        grammar; each of the three was a 500 before.
        """
        year_0 = "Sat, 01 Jan 0000 00:00:00 GMT"
        for name in ("Date", "Expires", "Last-Modified"):
            path = f"/y0-{name}.bin"
            self.scripted.serve(path, DATA, [(name, year_0)])
            response, body = await self.get(path)
            self.assertEqual((response.code, body, header(response, "X-Cache")), (200, DATA, "MISS"), name)
            response, body = await self.get(path, {"If-Modified-Since": year_0})
            self.assertIn(response.code, (200, 304), name)

    async def test_only_if_cached(self) -> None:
        """RFC 9111 §5.2.1.7: only-if-cached gets the stored answer or 504; the origin is never asked."""
        self.scripted.serve("/o.bin", DATA, [("Cache-Control", "max-age=600")])
        response, _ = await self.get("/o.bin", {"Cache-Control": "only-if-cached"})
        self.assertEqual(response.code, 504)
        self.assertEqual(self.scripted.requests, 0)
        await self.get("/o.bin")
        response, body = await self.get("/o.bin", {"Cache-Control": "only-if-cached"})
        self.assertEqual((response.code, header(response, "X-Cache"), body), (200, "HIT", DATA))
        self.assertEqual(self.scripted.requests, 1)

    async def test_viewer_no_cache_is_ignored_by_default(self) -> None:
        """The edge's choice (as nginx and Varnish): a viewer's no-cache does not reach past the cache."""
        self.scripted.serve("/n.bin", DATA, [("Cache-Control", "max-age=600")])
        await self.get("/n.bin")
        response, _ = await self.get("/n.bin", {"Cache-Control": "no-cache", "Pragma": "no-cache"})
        self.assertEqual(header(response, "X-Cache"), "HIT")
        self.assertEqual(self.scripted.requests, 1)

    async def test_viewer_no_cache_honoured_with_the_option(self) -> None:
        """RFC 9111 §5.2.1.4 with --viewer-no-cache: no-cache / max-age=0 make the edge revalidate."""
        await self.restart_edge(viewer_no_cache=True, hot_bytes=1 << 20)
        self.scripted.serve("/n.bin", DATA, [("Cache-Control", "max-age=600")])
        await self.get("/n.bin")
        for asked in ({"Cache-Control": "no-cache"}, {"Cache-Control": "max-age=0"}, {"Pragma": "no-cache"}):
            response, body = await self.get("/n.bin", asked)
            self.assertEqual((header(response, "X-Cache"), body), ("REVALIDATED", DATA), asked)
        self.assertEqual([r.header("if-none-match") is not None for r in self.scripted.log], [False, True, True, True])

    async def test_stale_while_revalidate(self) -> None:
        """RFC 5861 §3: within the window the stale answer goes out at once; one revalidation runs behind."""
        self.scripted.serve("/w.bin", DATA, [("Cache-Control", "max-age=0, stale-while-revalidate=600")])
        await self.get("/w.bin")
        first, body = await self.get("/w.bin")
        second, _ = await self.get("/w.bin")
        self.assertEqual((header(first, "X-Cache"), body), ("STALE", DATA))
        for _ in range(100):  # bounded: the background revalidation lands
            if not self.edge.filler.busy:
                break
            await self.settle(0.02)
        self.assertEqual([r.header("if-none-match") is not None for r in self.scripted.log][:2], [False, True])
        self.assertLessEqual(self.scripted.requests, 3)
        self.assertIn(header(second, "X-Cache"), ("STALE",))


class PrivacyTests(ScriptedEdgeTestCase):
    """Issue 9.5: Authorization and cookies (RFC 9111 §3.5)."""

    async def test_authorization_is_forwarded_and_its_answer_not_stored(self) -> None:
        """RFC 9111 §3.5: an answer to a request with Authorization is not stored unless it says so."""
        self.scripted.serve("/p.bin", DATA, [("Cache-Control", "max-age=600")])
        response, body = await self.get("/p.bin", {"Authorization": "Bearer alice"})
        self.assertEqual((body, header(response, "X-Cache")), (DATA, "BYPASS"))
        response, body = await self.get("/p.bin")
        self.assertEqual((body, header(response, "X-Cache")), (DATA, "MISS"))
        self.assertEqual([r.header("authorization") for r in self.scripted.log], ["Bearer alice", None])

    async def test_a_private_request_never_changes_the_stored_answer(self) -> None:
        """RFC 9111 §3.5: what an answer to a request with Authorization says is for that request alone."""
        self.scripted.serve("/p.bin", DATA, [("Cache-Control", "max-age=0")], etag=ETAG)
        await self.get("/p.bin")
        stored = self.store.get("/p.bin")
        assert stored is not None
        before = stored.meta
        response, body = await self.get("/p.bin", {"Authorization": "Bearer alice"})
        self.assertEqual((header(response, "X-Cache"), body), ("REVALIDATED", DATA))
        seen = self.scripted.log[-1]
        self.assertEqual((seen.header("authorization"), seen.header("if-none-match")), ("Bearer alice", ETAG))
        after = self.store.get("/p.bin")
        self.assertTrue(after is not None and after.meta is before)

    async def test_authorization_with_public_is_stored(self) -> None:
        """RFC 9111 §3.5: public (or s-maxage, must-revalidate) lets a shared cache keep it."""
        self.scripted.serve("/p.bin", DATA, [("Cache-Control", "public, max-age=600")])
        await self.get("/p.bin", {"Authorization": "Bearer alice"})
        response, body = await self.get("/p.bin")
        self.assertEqual((body, header(response, "X-Cache")), (DATA, "HIT"))
        self.assertEqual(self.scripted.requests, 1)

    async def test_a_private_answer_is_never_handed_to_a_coalesced_viewer(self) -> None:
        """RFC 9111 §3, §5.2.2.7: viewers sharing one origin contact get its answer only if it may be stored."""

        def handler(request: ScriptedRequest) -> Answer:
            body = f"for {request.header('cookie')}".encode()
            return Answer(200, [("Cache-Control", "private"), ("Content-Type", "text/plain")], body, delay=0.1)

        self.scripted.route("/me.json", handler)
        results = await defer.gatherResults([
            defer.Deferred.fromCoroutine(self.get("/me.json", {"Cookie": "user=alice"})),
            defer.Deferred.fromCoroutine(self.get("/me.json", {"Cookie": "user=bob"}))])
        self.assertEqual([body for _, body in results], [b"for user=alice", b"for user=bob"])
        self.assertEqual(sorted(r.header("cookie") or "" for r in self.scripted.log), ["user=alice", "user=bob"])

    async def test_set_cookie_answers_pass_through_unless_asked(self) -> None:
        """nginx's default (the edge's choice): an answer that sets a cookie is not stored; with
        --cache-set-cookie it is, without the cookie."""
        self.scripted.serve("/c.bin", DATA, [("Cache-Control", "max-age=600"), ("Set-Cookie", "s=1")])
        for _ in range(2):
            response, _ = await self.get("/c.bin")
            self.assertEqual((header(response, "X-Cache"), header(response, "Set-Cookie")), ("BYPASS", "s=1"))
        await self.restart_edge(store_set_cookie=True)
        first, _ = await self.get("/c.bin")
        second, body = await self.get("/c.bin")
        self.assertEqual([header(first, "X-Cache"), header(second, "X-Cache")], ["MISS", "HIT"])
        self.assertEqual([header(first, "Set-Cookie"), header(second, "Set-Cookie")], [None, None])
        self.assertEqual((body, self.scripted.requests), (DATA, 3))


class PartialContentTests(ScriptedEdgeTestCase):
    """Issue 9.7."""

    async def test_a_suffix_range_miss_costs_one_request(self) -> None:
        """RFC 9110 §14.1.2: bytes=-N on a miss: one ranged request whose answer holds the tail's slices whole."""
        self.scripted.serve("/t.bin", DATA)
        response, body = await self.get("/t.bin", {"Range": "bytes=-5"})
        self.assertEqual((response.code, body), (206, DATA[-5:]))
        self.assertEqual([r.header("range") for r in self.scripted.log], [f"bytes=-{5 + SLICE}"])
        response, body = await self.get("/t.bin", {"Range": f"bytes=-{len(DATA) - 3 * SLICE}"})
        self.assertEqual((header(response, "X-Cache"), body), ("HIT", DATA[3 * SLICE:]))
        self.assertEqual(self.scripted.requests, 1)

    async def test_a_head_miss_is_filled_with_a_ranged_get(self) -> None:
        """The edge's choice: a HEAD miss asks for the first slice with GET, so a later GET starts warm."""
        self.scripted.serve("/h.bin", DATA, [("Cache-Control", "max-age=600"), ("X-A", "1")])
        response, body = await self.get("/h.bin", method="HEAD")
        self.assertEqual((response.code, body, header(response, "X-A")), (200, b"", "1"))
        self.assertEqual(header(response, "Content-Length"), str(len(DATA)))
        self.assertEqual([(r.method, r.header("range")) for r in self.scripted.log], [("GET", f"bytes=0-{SLICE - 1}")])


class PassThroughTests(ScriptedEdgeTestCase):
    async def test_pass_through_keeps_fields_both_ways(self) -> None:
        """RFC 9110 §7.6: a pass-through request and its answer keep their end-to-end fields; nothing stored."""
        await self.restart_edge(pass_methods=["POST", "M-SEARCH"])
        self.scripted.route("/api", lambda r: Answer(201, [("Location", "/api/7"), ("X-Id", "7"),
                                                           ("Content-Type", "application/json")], b"{}"))
        response = await self.client.request("POST", self.edge_url + "/api", data=b"x=1",
                                             headers={"X-Token": "t", "Content-Type": "text/plain",
                                                      "Expect": "100-continue"})
        body = await response.content()
        self.assertEqual((response.code, body, header(response, "Location"), header(response, "X-Id")),
                         (201, b"{}", "/api/7", "7"))
        self.assertEqual(header(response, "X-Cache"), "BYPASS")
        seen = self.scripted.log[0]
        self.assertEqual((seen.method, seen.body, seen.header("x-token"), seen.header("content-type")),
                         ("POST", b"x=1", "t", "text/plain"))
        self.assertIsNone(seen.header("expect"))  # twisted.web answered 100 Continue itself
        response, _ = await self.get("/api", method="M-SEARCH")
        self.assertEqual(self.scripted.log[-1].method, "M-SEARCH")

    async def test_a_pass_through_answer_keeps_the_chain_of_caches(self) -> None:
        """
        RFC 9110 §7.6.3 and RFC 9211 §2: the answer of a parent tier to a pass-through method keeps
        its Via and its Cache-Status members, this edge's added after them, as on a GET (both were
        replaced by this edge's alone).
        """
        await self.restart_edge(pass_methods=["POST"])
        self.scripted.route("/api", lambda r: Answer(200, [("Via", "1.1 parent"),
                                                           ("Cache-Status", "parent; fwd=uri-miss")], b"ok"))
        response = await self.client.request("POST", self.edge_url + "/api", data=b"x=1")
        self.assertEqual(await response.content(), b"ok")
        self.assertEqual(headers_of(response, "Via"), ["1.1 parent, 1.1 edge.test"])
        self.assertEqual(headers_of(response, "Cache-Status"), ["parent; fwd=uri-miss, edge.test; fwd=uri-miss"])


class HotPathTests(ScriptedEdgeTestCase):
    """The hot path replays the stored header block, with an Age counted per second (issue 9, checks)."""

    def start_edge(self, origins: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("hot_bytes", 1 << 20)
        super().start_edge(origins, **kwargs)

    async def exchange(self, path: str, count: int, *extra: str) -> list[Any]:
        from twisted.internet.threads import deferToThread

        from tests.test_hot import exchange, get

        return await deferToThread(exchange, int(self.edge_port.getHost().port), [get(path, *extra)] * count)

    async def test_hot_answers_carry_the_block_and_a_true_age(self) -> None:
        """RFC 9111 §4.2.3, §5.1: a hot answer is the normal one, its Age counted anew."""
        small = DATA[:16 * 1024]
        self.scripted.serve("/s.bin", small, [("Cache-Control", "max-age=600"), ("X-Custom", "kept"),
                                              ("Access-Control-Allow-Origin", "*"), ("Age", "5")])
        answers = await self.exchange("/s.bin", 3)
        self.assertEqual([a.header("X-Cache") for a in answers], ["MISS", "HIT", "HIT"])
        self.assertEqual(self.edge.hot.hits, 1)
        normal, hot = answers[1], answers[2]
        self.assertEqual(hot.head, normal.head)
        for name in ("x-custom", "access-control-allow-origin", "date", "via"):
            self.assertEqual(hot.header(name), normal.header(name), name)
        self.assertEqual(hot.header("age"), "5")
        await self.settle(1.1)
        [later] = await self.exchange("/s.bin", 1)
        self.assertEqual(self.edge.hot.hits, 2)
        self.assertEqual((later.header("age"), later.header("date")), ("6", normal.header("date")))
        self.assertEqual(later.body, small)
        self.assertEqual(self.scripted.requests, 1)

    async def test_vary_answers_are_not_hot(self) -> None:
        """A Vary'd answer depends on request fields the hot path does not look at: it takes the normal road."""
        self.scripted.route("/v.json", lambda r: represent(r, b"v" * 100, [("Cache-Control", "max-age=600"),
                                                                            ("Vary", "X-Foo")]))
        answers = await self.exchange("/v.json", 3)
        self.assertEqual([a.header("X-Cache") for a in answers], ["MISS", "HIT", "HIT"])
        self.assertEqual(self.edge.hot.hits, 0)

    async def test_with_viewer_no_cache_a_request_with_cache_control_takes_the_normal_road(self) -> None:
        await self.restart_edge(viewer_no_cache=True)
        self.scripted.serve("/s.bin", DATA[:1000], [("Cache-Control", "max-age=600")])
        await self.exchange("/s.bin", 3)
        [answer] = await self.exchange("/s.bin", 1, "Cache-Control: no-cache")
        self.assertEqual(answer.header("X-Cache"), "REVALIDATED")
        self.assertEqual(self.edge.hot.hits, 1)


class OldSidecarTests(ScriptedEdgeTestCase):
    async def test_an_object_with_a_version_1_sidecar_is_served(self) -> None:
        """Sidecars from before the header block: decoded, their object served with the fields they kept."""
        import json

        self.scripted.serve("/o.bin", DATA, [("Cache-Control", "max-age=600"), ("X-Lost", "1")], etag=ETAG)
        await self.get("/o.bin")
        await self._stop_once(self._stop_edge)
        [path] = [os.path.join(d, f) for d, _, files in os.walk(self.cache_dir) for f in files if f.endswith(".meta")]
        with open(path) as f:
            raw = json.load(f)
        for name in ("status", "headers", "age", "swr", "sie", "revalidate", "vary", "variants"):
            del raw[name]
        raw["version"] = 1
        with open(path, "w") as f:
            json.dump(raw, f)
        await self.restart_edge()
        response, body = await self.get("/o.bin")
        self.assertEqual((response.code, header(response, "X-Cache"), body), (200, "HIT", DATA))
        self.assertEqual((header(response, "ETag"), header(response, "X-Lost")), (ETAG, None))
        self.assertIsNotNone(header(response, "Date"))
        self.assertEqual(self.scripted.requests, 1)


class SeekHeaderTests(ScriptedEdgeTestCase):
    async def test_a_seek_replays_the_block_with_its_own_validator(self) -> None:
        """RFC 9110 §8.8.3: a rewritten answer has its own ETag; the representation's digest is not replayed."""
        from tests.media import clip, have_ffmpeg

        if not have_ffmpeg():
            raise SkipTest("ffmpeg is needed")
        data = clip("av_faststart.mp4").read_bytes()
        self.scripted.serve("/c.mp4", data, [("Cache-Control", "max-age=600"), ("Link", "</c.vtt>; rel=x"),
                                             ("Repr-Digest", "sha-256=:x:"), ("Content-Type", "video/mp4")], etag=ETAG)
        whole, _ = await self.get("/c.mp4")
        seek, body = await self.get("/c.mp4?start=5")
        self.assertEqual((whole.code, seek.code), (200, 200))
        self.assertEqual([header(r, "Link") for r in (whole, seek)], ["</c.vtt>; rel=x"] * 2)
        self.assertEqual([header(r, "Repr-Digest") for r in (whole, seek)], ["sha-256=:x:", None])
        self.assertEqual(header(whole, "ETag"), ETAG)
        self.assertNotIn(header(seek, "ETag"), (ETAG, None))
        self.assertEqual(header(seek, "Cache-Control"), "max-age=600")
        self.assertEqual(len(body), seek.length)
        self.assertEqual(header(seek, "X-Cache"), "HIT")
