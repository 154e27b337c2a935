"""
The edge cache end to end: a real origin on 127.0.0.1, a real store on disk, real HTTP clients.
"""

from __future__ import annotations


import treq
from twisted.internet import defer, reactor, threads
from twisted.web.client import Agent

from h264edge.store import SliceStore
from h264edge.testing import MemoryOrigin, listen_origin
from tests.edgekit import SLICE, EdgeTestCase, header, random_bytes

BODY = random_bytes(10 * SLICE + 1234)


class MissAndHitTests(EdgeTestCase):
    async def test_miss_then_hit_is_byte_identical_and_fetches_once(self) -> None:
        self.origin.add("/v/clip.bin", BODY, content_type="video/mp4")
        first, body1 = await self.get("/v/clip.bin")
        second, body2 = await self.get("/v/clip.bin")
        self.assertEqual((first.code, second.code), (200, 200))
        self.assertEqual(body1, BODY)
        self.assertEqual(body2, BODY)
        self.assertEqual(header(first, "X-Cache"), "MISS")
        self.assertEqual(header(second, "X-Cache"), "HIT")
        self.assertEqual(self.origin.requests, 1)
        self.assertEqual(self.origin.bytes_sent, len(BODY))
        for response in (first, second):
            self.assertEqual(response.length, len(BODY))
            self.assertEqual(header(response, "Content-Type"), "video/mp4")
            self.assertEqual(header(response, "Accept-Ranges"), "bytes")
            self.assertEqual(header(response, "ETag"), self.origin.files["/v/clip.bin"].etag)
            self.assertEqual(header(response, "Last-Modified"), self.origin.files["/v/clip.bin"].last_modified)

    async def test_head_gives_headers_without_body(self) -> None:
        self.origin.add("/a.bin", BODY)
        response, body = await self.get("/a.bin", method="HEAD")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(header(response, "Content-Length"), str(len(BODY)))
        self.assertIn(header(response, "X-Cache"), ("MISS", "HIT", "PARTIAL"))

    async def test_twenty_concurrent_cold_requests_cause_one_fetch_per_slice(self) -> None:
        self.origin.add("/hot.bin", BODY)
        self.origin.dribble = (16 * 1024, 0.002)
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.get("/hot.bin")) for _ in range(20)]
        )
        for response, body in results:
            self.assertEqual(response.code, 200)
            self.assertEqual(body, BODY)
        self.assertEqual(self.origin.requests, 1)
        self.assertEqual(self.origin.bytes_sent, len(BODY))

    async def test_a_miss_sends_its_headers_before_the_body_arrives(self) -> None:
        self.origin.add("/slow.bin", BODY)
        self.origin.hold_body = 1.0  # the origin answers at once, its first body byte comes 1 s later
        response = await self.client.request("GET", self.edge_url + "/slow.bin", unbuffered=True)
        self.assertEqual(self.origin.log[-1].sent, 0, "the headers waited for the origin's body")
        self.assertEqual((response.code, header(response, "X-Cache")), (200, "MISS"))
        self.assertEqual(await response.content(), BODY)

    async def test_a_partial_hit_keeps_its_headers_until_the_origin_answered(self) -> None:
        self.origin.add("/p.bin", BODY)
        await self.get("/p.bin", {"Range": f"bytes={SLICE}-{SLICE + 10}"})  # slice 1 only
        self.origin.hold_body = 1.0
        response = await self.client.request("GET", self.edge_url + "/p.bin", unbuffered=True)
        # the missing slices' answer could still have said the object changed: no early headers
        self.assertTrue(any(entry.sent > 0 for entry in self.origin.log[1:]), "headers before any body")
        self.assertEqual((response.code, await response.content()), (200, BODY))

    async def test_empty_object(self) -> None:
        self.origin.add("/empty.bin", b"")
        response, body = await self.get("/empty.bin")
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(response.length, 0)


class RangeTests(EdgeTestCase):
    async def test_range_miss_fetches_only_its_slices(self) -> None:
        self.origin.add("/r.bin", BODY)
        first, last = 3 * SLICE + 100, 4 * SLICE + 50
        response, body = await self.get("/r.bin", {"Range": f"bytes={first}-{last}"})
        self.assertEqual(response.code, 206)
        self.assertEqual(body, BODY[first : last + 1])
        self.assertEqual(header(response, "Content-Range"), f"bytes {first}-{last}/{len(BODY)}")
        self.assertEqual(self.origin.bytes_sent, 2 * SLICE)  # slices 3 and 4 only
        self.assertEqual(self.origin.log[0].range, f"bytes={3 * SLICE}-{5 * SLICE - 1}")

    async def test_suffix_and_open_ranges(self) -> None:
        self.origin.add("/r.bin", BODY)
        response, body = await self.get("/r.bin", {"Range": "bytes=-100"})
        self.assertEqual((response.code, body), (206, BODY[-100:]))
        response, body = await self.get("/r.bin", {"Range": f"bytes={len(BODY) - 10}-"})
        self.assertEqual((response.code, body), (206, BODY[-10:]))

    async def test_suffix_range_miss_fetches_only_the_tail(self) -> None:
        self.origin.add("/r.bin", BODY)
        response, body = await self.get("/r.bin", {"Range": "bytes=-100"})
        self.assertEqual((response.code, body), (206, BODY[-100:]))
        self.assertLessEqual(self.origin.bytes_sent, 2 * SLICE)

    async def test_range_served_from_cache_says_hit(self) -> None:
        self.origin.add("/r.bin", BODY)
        await self.get("/r.bin", {"Range": "bytes=0-10"})
        response, body = await self.get("/r.bin", {"Range": "bytes=5-20"})
        self.assertEqual((header(response, "X-Cache"), body), ("HIT", BODY[5:21]))
        response, body = await self.get("/r.bin")
        self.assertEqual((header(response, "X-Cache"), body), ("PARTIAL", BODY))

    async def test_unsatisfiable_range_is_416(self) -> None:
        self.origin.add("/r.bin", BODY)
        await self.get("/r.bin")
        response, _ = await self.get("/r.bin", {"Range": f"bytes={len(BODY)}-"})
        self.assertEqual(response.code, 416)
        self.assertEqual(header(response, "Content-Range"), f"bytes */{len(BODY)}")

    async def test_multiple_ranges_answer_whole_body(self) -> None:
        self.origin.add("/r.bin", BODY)
        response, body = await self.get("/r.bin", {"Range": "bytes=0-10,20-30"})
        self.assertEqual((response.code, body), (200, BODY))

    async def test_origin_that_ignores_range_still_works(self) -> None:
        self.origin.add("/r.bin", BODY)
        self.origin.ignore_range = True
        first, last = 5 * SLICE + 7, 5 * SLICE + 99
        response, body = await self.get("/r.bin", {"Range": f"bytes={first}-{last}"})
        self.assertEqual((response.code, body), (206, BODY[first : last + 1]))
        response, body = await self.get("/r.bin")
        self.assertEqual((response.code, body), (200, BODY))


class ConditionalTests(EdgeTestCase):
    async def test_if_none_match_gives_304(self) -> None:
        f = self.origin.add("/c.bin", BODY)
        response, body = await self.get("/c.bin", {"If-None-Match": f.etag})
        self.assertEqual((response.code, body), (304, b""))
        response, body = await self.get("/c.bin", {"If-None-Match": '"other"'})
        self.assertEqual((response.code, body), (200, BODY))

    async def test_if_modified_since(self) -> None:
        f = self.origin.add("/c.bin", BODY)
        response, _ = await self.get("/c.bin", {"If-Modified-Since": f.last_modified})
        self.assertEqual(response.code, 304)
        response, _ = await self.get("/c.bin", {"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"})
        self.assertEqual(response.code, 200)

    async def test_if_range_matching_gives_206_else_200(self) -> None:
        f = self.origin.add("/c.bin", BODY)
        response, body = await self.get("/c.bin", {"Range": "bytes=0-9", "If-Range": f.etag})
        self.assertEqual((response.code, body), (206, BODY[:10]))
        response, body = await self.get("/c.bin", {"Range": "bytes=0-9", "If-Range": '"stale"'})
        self.assertEqual((response.code, body), (200, BODY))


class ReadWhileWriteTests(EdgeTestCase):
    async def test_first_bytes_arrive_before_the_origin_finishes(self) -> None:
        self.origin.add("/slow.bin", BODY)
        self.origin.dribble = (8 * 1024, 0.02)  # ~ 1.7 s for the whole body
        response = await self.client.get(self.edge_url + "/slow.bin", unbuffered=True)
        self.assertEqual(response.code, 200)
        got = defer.Deferred()
        chunks: list[bytes] = []
        from twisted.internet.protocol import Protocol

        class Collect(Protocol):
            def dataReceived(self, data: bytes) -> None:
                if not chunks:
                    got.callback(None)
                chunks.append(data)

            def connectionLost(self, reason: object) -> None:
                done.callback(None)

        done: defer.Deferred[None] = defer.Deferred()
        response.deliverBody(Collect())
        await got
        self.assertLess(self.origin.log[0].sent, len(BODY), "the viewer waited for the whole body")
        self.assertLess(self.origin.log[0].sent, SLICE, "the viewer waited for a whole slice")
        await done
        self.assertEqual(b"".join(chunks), BODY)


class FailureTests(EdgeTestCase):
    async def test_origin_abort_mid_body_is_resumed_and_cache_holds_right_bytes(self) -> None:
        self.origin.add("/a.bin", BODY)
        self.origin.abort_after = 3 * SLICE + 5000
        self.origin.aborts_left = 2
        response, body = await self.get("/a.bin")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, BODY)
        self.assertEqual(self.origin.requests, 3)
        # the resumption asks for the bytes after the last one that arrived, not for the whole body
        resumed_from = int(self.origin.log[1].range.split("=")[1].split("-")[0])
        self.assertGreater(resumed_from, 2 * SLICE)
        self.assertLessEqual(resumed_from, 3 * SLICE + 5000)
        await self.restart_edge()
        response, body = await self.get("/a.bin")
        self.assertEqual((header(response, "X-Cache"), body), ("HIT", BODY))

    async def test_body_that_never_comes_after_early_headers_aborts_short(self) -> None:
        self.origin.add("/a.bin", BODY)
        self.origin.abort_after = 0  # every answer: headers, then the connection drops
        self.origin.aborts_left = 100
        response = await self.client.request("GET", self.edge_url + "/a.bin", unbuffered=True)
        self.assertEqual(response.code, 200)  # sent once the origin's answer was checked
        with self.assertRaises(Exception):
            await response.content()  # the resumptions failed too: short of Content-Length, never wrong
        self.assertGreater(self.origin.requests, 2)
        obj = self.store.get("/a.bin")
        self.assertTrue(obj is None or obj.available_from(0) == 0)

    async def test_connection_dropped_before_the_answer_goes_to_the_next_origin_not_the_same(self) -> None:
        """RFC 9110 §9.2.2: a GET may be retried, but each origin is asked once per answer."""
        self.origin.add("/d.bin", BODY)
        self.origin.drops_left = 1
        response, body = await self.get("/d.bin")
        self.assertEqual(response.code, 502)
        self.assertEqual([entry.code for entry in self.origin.log], [0])
        second = MemoryOrigin()
        second.add("/d.bin", BODY)
        port, url = listen_origin(second)
        self.addCleanup(port.stopListening)
        await self.restart_edge(origins=[self.origin_url, url])
        self.origin.drops_left = 1
        response, body = await self.get("/d.bin")
        self.assertEqual((response.code, body), (200, BODY))
        self.assertEqual([entry.code for entry in self.origin.log], [0, 0])
        self.assertEqual([entry.code for entry in second.log], [206])

    async def test_origin_gone_for_good_never_marks_missing_bytes(self) -> None:
        self.origin.add("/a.bin", BODY)
        self.origin.abort_after = 2 * SLICE + 100
        self.origin.aborts_left = 100
        response = await self.client.get(self.edge_url + "/a.bin")
        body = b""
        try:
            body = await response.content()
        except Exception:
            pass  # the edge drops the connection: the viewer sees a short body, never wrong bytes
        self.assertTrue(BODY.startswith(body))
        self.assertLess(len(body), len(BODY))
        obj = self.store.get("/a.bin")
        self.assertIsNotNone(obj)
        assert obj is not None
        self.assertEqual(obj.missing_slices(2, obj.slice_count - 1), list(range(2, obj.slice_count)))
        self.origin.aborts_left = 0
        response, body = await self.get("/a.bin")
        self.assertEqual(body, BODY)

    async def test_all_origins_down_and_nothing_cached_is_502(self) -> None:
        await self.origin_port.stopListening()
        response, body = await self.get("/nothing.bin")
        self.assertEqual(response.code, 502)
        self.assertIn(b"no origin answered", body)
        self.assertEqual(header(response, "Content-Type"), "text/plain; charset=utf-8")

    async def test_origin_5xx_fails_over_to_next_origin(self) -> None:
        second = MemoryOrigin()
        second.add("/f.bin", BODY)
        port, url = listen_origin(second)
        self.addCleanup(port.stopListening)
        await self._stop_once(self._stop_edge)
        self.start_edge(origins=[self.origin_url, url])
        self.origin.fail_code = 503
        response, body = await self.get("/f.bin")
        self.assertEqual((response.code, body), (200, BODY))
        self.assertEqual(self.origin.requests, 1)

    async def test_origin_404_is_relayed(self) -> None:
        response, _ = await self.get("/missing.bin")
        self.assertEqual(response.code, 404)

    async def test_stale_copy_served_when_origin_is_down(self) -> None:
        self.origin.add("/s.bin", BODY, cache_control="max-age=0")
        response, body = await self.get("/s.bin")
        self.assertEqual(body, BODY)
        await self.origin_port.stopListening()
        await self.origin_client.pool.closeCachedConnections()
        response, body = await self.get("/s.bin")
        self.assertEqual((response.code, body), (200, BODY))


class FreshnessTests(EdgeTestCase):
    async def test_stale_object_revalidated_with_304_is_not_refetched(self) -> None:
        self.origin.add("/s.bin", BODY, cache_control="max-age=0")
        await self.get("/s.bin")
        response, body = await self.get("/s.bin")
        self.assertEqual((response.code, body), (200, BODY))
        self.assertEqual(self.origin.log[1].code, 304)
        self.assertEqual(self.origin.bytes_sent, len(BODY))

    async def test_changed_validators_drop_old_slices_and_refetch(self) -> None:
        self.origin.add("/s.bin", BODY, cache_control="max-age=0")
        await self.get("/s.bin")
        new = random_bytes(len(BODY) - 999, seed=2)
        self.origin.add("/s.bin", new, cache_control="max-age=0")
        response, body = await self.get("/s.bin")
        self.assertEqual(body, new)
        response, body = await self.get("/s.bin", {"Range": "bytes=0-99"})
        self.assertEqual(body, new[:100])

    async def test_no_store_answers_are_not_kept(self) -> None:
        self.origin.add("/p.bin", BODY, cache_control="no-store")
        _, body = await self.get("/p.bin")
        _, body2 = await self.get("/p.bin")
        self.assertEqual((body, body2), (BODY, BODY))
        self.assertEqual(self.origin.requests, 2)
        self.assertIsNone(self.store.get("/p.bin"))


class LRUTests(EdgeTestCase):
    max_size = 3 * (10 * SLICE + 1234)

    async def test_least_recently_used_is_evicted_first(self) -> None:
        for name in "abc":
            self.origin.add(f"/{name}.bin", BODY)
            await self.get(f"/{name}.bin")
        await self.get("/a.bin")  # a is now more recent than b
        self.origin.add("/d.bin", BODY)
        await self.get("/d.bin")
        self.assertEqual(self.store.keys_lru(), ["/c.bin", "/a.bin", "/d.bin"])
        requests = self.origin.requests
        response, _ = await self.get("/a.bin")
        self.assertEqual(header(response, "X-Cache"), "HIT")
        response, body = await self.get("/b.bin")
        self.assertEqual((header(response, "X-Cache"), body), ("MISS", BODY))
        self.assertEqual(self.origin.requests, requests + 1)

    async def test_restart_on_same_cache_dir_serves_hit(self) -> None:
        self.origin.add("/a.bin", BODY)
        await self.get("/a.bin")
        await self.restart_edge()
        response, body = await self.get("/a.bin")
        self.assertEqual((header(response, "X-Cache"), body), ("HIT", BODY))
        self.assertEqual(self.origin.requests, 1)


class RequestRulesTests(EdgeTestCase):
    async def test_traversal_attempts_are_rejected(self) -> None:
        self.origin.add("/ok.bin", BODY)
        for path in ("/../etc/passwd", "/a/%2e%2e/%2e%2e/etc/passwd", "/a%2f..%2f..%2fetc", "/x%00.mp4",
                     "/a/./b.bin", "/a%5c..%5cb"):
            response, body = await self.get(path)
            self.assertEqual(response.code, 400, path)
        self.assertEqual(self.origin.requests, 0)

    async def test_other_methods_are_405(self) -> None:
        self.origin.add("/ok.bin", BODY)
        response, _ = await self.get("/ok.bin", method="POST")
        self.assertEqual(response.code, 405)
        self.assertEqual(header(response, "Allow"), "GET, HEAD")
        self.assertEqual(self.origin.requests, 0)

    async def test_pass_method_is_forwarded_and_invalidates(self) -> None:
        await self._stop_once(self._stop_edge)
        self.start_edge(pass_methods=["DELETE"])
        self.origin.add("/ok.bin", BODY)
        await self.get("/ok.bin")
        self.assertIsNotNone(self.store.get("/ok.bin"))
        response, _ = await self.get("/ok.bin", method="DELETE")
        self.assertEqual(self.origin.log[-1].method, "DELETE")
        self.assertIsNone(self.store.get("/ok.bin"))

    async def test_start_and_end_are_ordinary_parameters_on_other_paths(self) -> None:
        self.origin.add("/list.json", BODY)
        await self.get("/list.json?start=5&x=1")
        response, body = await self.get("/list.json?start=5&x=1")
        self.assertEqual((header(response, "X-Cache"), body), ("HIT", BODY))
        response, _ = await self.get("/list.json?start=6&x=1")
        self.assertEqual(header(response, "X-Cache"), "MISS")
        self.assertEqual([entry.path for entry in self.origin.log], ["/list.json?start=5&x=1", "/list.json?start=6&x=1"])

    async def test_ignore_query_drops_the_query_from_the_key(self) -> None:
        await self._stop_once(self._stop_edge)
        self.start_edge(keep_query=False)
        self.origin.add("/q.bin", BODY)
        await self.get("/q.bin?utm=1")
        response, _ = await self.get("/q.bin?utm=2")
        self.assertEqual(header(response, "X-Cache"), "HIT")


class OriginTimeoutTests(EdgeTestCase):
    async def test_origin_that_never_answers_gives_504_then_fails_over(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol

        class Silent(Protocol):
            def dataReceived(self, data: bytes) -> None:
                pass  # accept the request and never answer

        factory = Factory.forProtocol(Silent)
        silent = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        silent_url = f"http://127.0.0.1:{silent.getHost().port}/"
        await self._stop_once(self._stop_edge)
        self.start_edge(origins=[silent_url])
        self.origin_client.timeout = 0.5
        response, body = await self.get("/slow.bin")
        self.assertEqual(response.code, 504)
        await self._stop_once(self._stop_edge)
        self.origin.add("/slow.bin", BODY)
        self.start_edge(origins=[silent_url, self.origin_url])
        self.origin_client.timeout = 0.5
        response, body = await self.get("/slow.bin")
        self.assertEqual((response.code, body), (200, BODY))


class PurgeTests(EdgeTestCase):
    async def test_purge_from_loopback_drops_the_object(self) -> None:
        self.origin.add("/p.bin", BODY)
        await self.get("/p.bin")
        response, body = await self.get("/p.bin", method="PURGE")
        self.assertEqual((response.code, body), (200, b"purged /p.bin\n"))
        self.assertIsNone(self.store.get("/p.bin"))
        response, _ = await self.get("/p.bin", method="PURGE")
        self.assertEqual(response.code, 404)
        response, body = await self.get("/p.bin")
        self.assertEqual((header(response, "X-Cache"), body), ("MISS", BODY))


class ResumeTests(EdgeTestCase):
    async def test_resume_answered_with_200_completes_the_half_written_slice(self) -> None:
        self.origin.add("/r.bin", BODY)
        self.origin.abort_after = 3 * SLICE + 5000
        self.origin.aborts_left = 1
        self.origin.dribble = (30001, 0.0)  # pieces that never line up with the cut
        self.origin.ignore_range = True
        response, body = await self.get("/r.bin")
        self.assertEqual((response.code, body), (200, BODY))
        self.assertEqual(self.origin.requests, 2)

    async def test_origin_that_drops_every_long_body_still_completes(self) -> None:
        big = random_bytes(40 * SLICE, seed=3)
        self.origin.add("/big.bin", big)
        self.origin.drop_every = 100_000  # no answer carries more than 100 kB
        response, body = await self.get("/big.bin")
        self.assertEqual((response.code, body), (200, big))
        self.assertGreater(self.origin.requests, 20)

    async def test_tail_range_during_a_slow_whole_miss_does_not_wait_for_the_fill(self) -> None:
        big = random_bytes(40 * SLICE, seed=4)
        self.origin.add("/big.bin", big)
        self.origin.dribble = (16 * 1024, 0.01)  # the whole body takes ~1.6 s
        whole = defer.Deferred.fromCoroutine(self.get("/big.bin"))
        await self.settle(0.1)
        response, body = await self.get("/big.bin", {"Range": f"bytes={len(big) - 100}-"})
        self.assertEqual((response.code, body), (206, big[-100:]))
        self.assertLess(self.origin.log[0].sent, len(big) // 2, "the tail waited for the sequential fill")
        response, body = await whole
        self.assertEqual(body, big)
        self.assertLessEqual(self.origin.bytes_sent, len(big) + 2 * SLICE)

    async def test_object_gone_at_the_origin_during_the_fill_is_dropped(self) -> None:
        self.origin.add("/g.bin", BODY)
        await self.get("/g.bin", {"Range": "bytes=0-10"})
        del self.origin.files["/g.bin"]
        response, body = await self.get("/g.bin", {"Range": f"bytes={5 * SLICE}-{5 * SLICE + 10}"})
        self.assertNotEqual(response.code, 206)
        self.assertIsNone(self.store.get("/g.bin"))


class ValidatorTests(EdgeTestCase):
    async def test_same_size_new_etag_is_refetched_not_mixed(self) -> None:
        self.origin.add("/v.bin", BODY, cache_control="max-age=0")
        await self.get("/v.bin", {"Range": "bytes=0-10"})  # slice 0 only
        new = random_bytes(len(BODY), seed=9)
        self.origin.add("/v.bin", new, cache_control="max-age=0")
        response, body = await self.get("/v.bin")
        self.assertEqual(body, new)

    async def test_without_validators_old_slices_are_never_reused(self) -> None:
        f = self.origin.add("/n.bin", BODY, cache_control="max-age=0")
        f.etag = None
        f.last_modified = None
        await self.get("/n.bin", {"Range": "bytes=0-10"})
        new = random_bytes(len(BODY), seed=10)
        g = self.origin.add("/n.bin", new, cache_control="max-age=0")
        g.etag = None
        g.last_modified = None
        response, body = await self.get("/n.bin")
        self.assertEqual(body, new)

    async def test_stale_copy_is_served_at_once_while_origins_are_known_down(self) -> None:
        self.origin.add("/s.bin", BODY, cache_control="max-age=0")
        await self.get("/s.bin")
        await self.origin_port.stopListening()
        await self.origin_client.pool.closeCachedConnections()
        requests = self.origin_client.requests
        for _ in range(3):
            response, body = await self.get("/s.bin")
            self.assertEqual((response.code, body), (200, BODY))
        # one contact (its refused connect marks the origin down: no second round), then none
        self.assertEqual(self.origin_client.requests, requests + 1)


class TransientTests(EdgeTestCase):
    async def test_no_store_fetch_stops_when_its_viewer_leaves(self) -> None:
        big = random_bytes(40 * SLICE, seed=5)
        self.origin.add("/live.bin", big, cache_control="no-store")
        self.origin.dribble = (16 * 1024, 0.01)
        response = await self.client.get(self.edge_url + "/live.bin", unbuffered=True)
        self.assertEqual(response.code, 200)
        from twisted.internet.protocol import Protocol

        got: defer.Deferred[None] = defer.Deferred()

        class LeaveEarly(Protocol):
            def dataReceived(self, data: bytes) -> None:
                if not got.called:
                    got.callback(None)
                    self.transport.stopProducing()  # the viewer leaves

        response.deliverBody(LeaveEarly())
        await got
        await self.settle(0.5)
        sent = self.origin.bytes_sent
        await self.settle(0.3)
        self.assertEqual(self.origin.bytes_sent, sent, "the origin kept sending to nobody")
        self.assertLess(sent, len(big) // 2)


class FullDiskTests(EdgeTestCase):
    """Writes refused by the disk (simulated here; tests.test_full_disk fills a real one)."""

    async def test_a_disk_refusing_writes_midway_still_gives_the_whole_answer(self) -> None:
        import errno

        import h264edge.store._store as store_module

        self.origin.add("/f.bin", BODY)
        real_pwrite = store_module.os.pwrite
        writes = {"n": 0}

        def failing_pwrite(fd: int, data: bytes, offset: int) -> int:
            writes["n"] += 1
            if writes["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_pwrite(fd, data, offset)

        self.patch(store_module.os, "pwrite", failing_pwrite)
        response, body = await self.get("/f.bin")
        self.assertEqual((response.code, body), (200, BODY))  # the rest came through memory
        self.assertIsNone(self.store.get("/f.bin"))  # nothing of it is kept
        self.assertEqual(self.store.uncached, 1)
        self.patch(store_module.os, "pwrite", real_pwrite)
        response, body = await self.get("/f.bin")
        self.assertEqual((response.code, body), (200, BODY))
        response, body = await self.get("/f.bin")
        self.assertEqual((header(response, "X-Cache"), body), ("HIT", BODY))

    async def test_while_the_disk_refuses_every_write_misses_stream_through(self) -> None:
        import errno

        import h264edge.store._store as store_module

        self.origin.add("/a.bin", BODY)
        self.origin.add("/b.bin", BODY)
        real_pwrite = store_module.os.pwrite

        def full(fd: int, data: bytes, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(store_module.os, "pwrite", full)
        for path in ("/a.bin", "/b.bin", "/a.bin"):
            response, body = await self.get(path)
            self.assertEqual((response.code, header(response, "X-Cache"), body), (200, "MISS", BODY))
        self.assertEqual(len(self.store), 0)
        self.patch(store_module.os, "pwrite", real_pwrite)
        response, body = await self.get("/b.bin")
        self.assertEqual((response.code, body), (200, BODY))
        response, body = await self.get("/b.bin")
        self.assertEqual((header(response, "X-Cache"), body), ("HIT", BODY))


class ThreadedSyncEdgeTests(EdgeTestCase):
    """The server's store setting: fdatasync in a thread, sidecars written when it returns."""

    store_options = {"sync": True, "run_in_thread": threads.deferToThread}

    async def test_a_fill_survives_a_crash_once_its_sync_landed(self) -> None:
        data = random_bytes(40 * SLICE + 100, seed=4)
        self.origin.add("/v.mp4", data)
        response, body = await self.get("/v.mp4")
        self.assertEqual(body, data)
        for _ in range(200):  # bounded: 10 s for the last batch's sync to land
            if not self.store._dirty:
                break
            await self.settle()
        # a crash: a new store on the directory, without close(); everything must be listed
        crashed = SliceStore(self.cache_dir, max_size=self.max_size, slice_size=self.slice_size)
        for _ in crashed.rebuild_steps():
            pass
        loaded = crashed.get("/v.mp4")
        assert loaded is not None
        self.assertTrue(loaded.complete)
        self.assertEqual(loaded.read(0, len(data)), data)
        await self.restart_edge()
        response, body = await self.get("/v.mp4")
        self.assertEqual((header(response, "X-Cache"), body, self.origin.requests), ("HIT", data, 1))


class OriginHygieneTests(EdgeTestCase):
    """The edge asks for identity bodies only and never replays cookies an origin set."""

    async def test_identity_only_and_no_cookies_of_the_origin(self) -> None:
        """The origin's Set-Cookie is never replayed; a viewer's own Cookie goes with its own request only."""
        self.origin.add("/a.bin", random_bytes(1000), set_cookie="session=viewer-a; Path=/")
        self.origin.add("/b.bin", random_bytes(1000, seed=2))
        self.origin.add("/c.bin", random_bytes(1000, seed=3))
        response, _ = await self.get("/a.bin")
        self.assertEqual(header(response, "Set-Cookie"), "session=viewer-a; Path=/")  # passed through, unstored
        self.assertEqual(header(response, "X-Cache"), "BYPASS")
        self.client = treq.client.HTTPClient(Agent(reactor, pool=self.client_pool))  # a viewer without that cookie
        await self.get("/b.bin", headers={"Cookie": "mine=1"})
        await self.get("/c.bin")
        for entry in self.origin.log:
            self.assertEqual(entry.headers.get("accept-encoding"), "identity")
        self.assertEqual([entry.headers.get("cookie") for entry in self.origin.log], [None, "mine=1", None])

    async def test_an_encoded_answer_is_refused_not_decoded(self) -> None:
        import gzip

        data = random_bytes(5000)
        self.origin.add("/z.json", gzip.compress(data), content_encoding="gzip")
        response, body = await self.get("/z.json")
        self.assertEqual(response.code, 502)
        self.assertIn(b"Content-Encoding", body)
        self.assertIsNone(self.store.get("/z.json"))
        # a second origin that behaves answers instead
        good = MemoryOrigin()
        good.add("/z.json", data)
        port, good_url = listen_origin(good)
        self.addCleanup(port.stopListening)
        await self.restart_edge(origins=[self.origin_url, good_url])
        response, body = await self.get("/z.json")
        self.assertEqual((response.code, body), (200, data))
        self.assertEqual(good.requests, 1)
        await self.restart_edge()
        self.store.remove("/z.json")
        self.origin.add("/z.json", data)  # the origin is fixed: served and cached as sent
        response, body = await self.get("/z.json")
        self.assertEqual((response.code, body), (200, data))

    async def test_probe_reports_each_origin_and_leaves_a_pooled_connection(self) -> None:
        from h264edge.origin import OriginClient

        dead = listen_origin(MemoryOrigin())[0]
        dead_url = f"http://127.0.0.1:{dead.getHost().port}/"
        await dead.stopListening()
        client = OriginClient([self.origin_url, dead_url], timeout=5)
        self.addCleanup(client.pool.closeCachedConnections)
        results = await client.probe()
        self.assertEqual(results[self.origin_url], "HTTP 404")  # any status: it answers
        self.assertTrue(results[dead_url].startswith("unreachable"), results)
        self.assertEqual([(e.method, e.path) for e in self.origin.log], [("HEAD", "/")])
        self.assertEqual(sum(len(c) for c in client.pool._connections.values()), 1)
