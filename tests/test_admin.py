"""
The admin listener against a running edge (the service graph twistd runs, on real sockets): /metrics,
/healthz, /readyz, the purge API, and PURGE on the viewer port with a token and trusted proxies.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from h264edge.testing import MemoryOrigin
from h264edge.web.http import PurgeAuth, bearer_token, forwarded_client, parse_networks
from tests.edgekit import RawClient, random_bytes
from tests.media import clip, have_ffmpeg
from tests.running import RunningEdge, free_port, serve_origin, sleep, until
from tests.served import ServedEdgeTestCase, samples, value


class MetricsTests(ServedEdgeTestCase):
    extra = ("--max-size=256K",)

    async def test_answers_bytes_origins_and_cache_are_counted(self) -> None:
        body = random_bytes(100_000)
        self.origin.add("/a.bin", body)
        self.origin.add("/small.bin", b"s" * 1000)
        for _ in range(2):  # a miss, a hit (both close their connection: not kept for the hot path)
            self.assertEqual((await self.request("/small.bin"))[:2], (200, b"s" * 1000))
        keep_alive = RawClient(self.port)  # a hit by the normal road, then a hot one
        self.addCleanup(keep_alive.close)
        for _ in range(2):
            keep_alive.send_get("/small.bin")
            hit = await deferToThread(keep_alive.read_response)
            self.assertEqual((hit.status, hit.header("x-cache"), hit.body), (200, "HIT", b"s" * 1000))
        self.assertEqual(self.top.resource.hot.hits, 1)  # type: ignore[attr-defined]
        self.assertEqual((await self.request("/a.bin"))[1], body)
        self.assertEqual((await self.request("/a.bin", "HEAD"))[0], 200)
        self.assertEqual((await self.request("/nope.bin"))[0], 404)
        # a viewer that leaves early: its answer is counted, cut
        self.origin.add("/big.bin", random_bytes(400_000, seed=2))
        self.origin.dribble = (8192, 0.02)
        viewer = RawClient(self.port)
        viewer.send_get("/big.bin")
        got = await deferToThread(viewer.read_some_then_close, 20_000, True)
        self.origin.dribble = None
        self.assertGreater(got, 0)
        found: dict[Any, float] = {}

        async def cut_counted() -> bool:
            found.update(await self.scrape())
            return value(found, "h264edge_cut_answers_total") == 1

        for _ in range(100):  # bounded: the edge sees the reset on its next write
            if await cut_counted():
                break
            await sleep(0.05)
        self.assertEqual(value(found, "h264edge_cut_answers_total"), 1)
        self.assertEqual(value(found, "h264edge_requests_total", method="GET", cache="MISS", code="200"), 3)
        self.assertEqual(value(found, "h264edge_requests_total", method="GET", cache="HIT", code="200"), 3)
        self.assertEqual(value(found, "h264edge_requests_total", method="HEAD", cache="HIT", code="200"), 1)
        self.assertEqual(value(found, "h264edge_requests_total", method="GET", cache="BYPASS", code="404"), 1)
        self.assertEqual(value(found, "h264edge_sent_bytes_total", cache="HIT"), 3000)
        sent_miss = value(found, "h264edge_sent_bytes_total", cache="MISS")
        self.assertGreaterEqual(sent_miss, 1000 + len(body))
        self.assertLess(sent_miss, 1000 + len(body) + 400_000)
        origin_sent = self.origin.bytes_sent + len(b"not found\n")  # MemoryOrigin counts no error body
        self.assertEqual(value(found, "h264edge_origin_bytes_total", origin=self.origin_url), origin_sent)
        self.assertGreaterEqual(value(found, "h264edge_fill_latency_seconds_count", origin=self.origin_url), 3)
        self.assertEqual(value(found, "h264edge_first_byte_seconds_count"), 7)  # normal road, finished or cut
        self.assertEqual(value(found, "h264edge_cache_admissions_total"), 2)
        # 256K of cache: the 400K object is streamed through; the rest fits
        self.assertEqual(value(found, "h264edge_cache_max_bytes"), 256 * 1024)
        self.assertEqual(value(found, "h264edge_cache_objects"), 2)
        self.assertEqual(value(found, "h264edge_cache_bytes"), 101_000)
        self.assertEqual(value(found, "h264edge_info", version=__import__("h264edge").__version__), 1)

    async def test_evictions_and_open_connections(self) -> None:
        for name in ("e1", "e2", "e3"):
            self.origin.add(f"/{name}.bin", random_bytes(100_000, seed=len(name)))
            self.assertEqual((await self.request(f"/{name}.bin"))[0], 200)
        idle = RawClient(self.port)
        self.addCleanup(idle.close)
        idle.send_get("/e3.bin")
        await deferToThread(idle.read_response)
        await until(lambda: True)
        found = await self.scrape()
        self.assertEqual(value(found, "h264edge_cache_evictions_total"), 1)
        self.assertEqual(value(found, "h264edge_cache_evicted_bytes_total"), 100_000)
        self.assertEqual(value(found, "h264edge_open_connections"), 1)  # the idle keep-alive one

    async def test_origin_errors_by_kind(self) -> None:
        self.origin.fail_code = 503
        code, _, response = await self.request("/x.bin")
        self.assertEqual(code, 503)  # the origin's 5xx, relayed
        cache = response.headers.getRawHeaders("X-Cache")[0]
        found = await self.scrape()
        self.assertEqual(value(found, "h264edge_origin_errors_total", origin=self.origin_url, kind="status_5xx"), 1)
        self.assertEqual(value(found, "h264edge_requests_total", method="GET", cache=cache, code="503"), 1)

    async def test_seek_answers_by_container(self) -> None:
        if not have_ffmpeg():
            raise SkipTest("ffmpeg is not installed")
        with open(clip("av_faststart.mp4"), "rb") as f:
            self.origin.add("/s.mp4", f.read(), content_type="video/mp4")
        self.assertEqual((await self.request("/s.mp4?start=4"))[0], 200)
        self.assertEqual((await self.request("/s.mp4?start=0"))[0], 200)  # the whole file: not a seek
        found = await self.scrape()
        self.assertEqual(value(found, "h264edge_seek_answers_total", container="mp4"), 1)


class HealthTests(ServedEdgeTestCase):
    async def test_healthz_and_readyz(self) -> None:
        self.assertEqual((await self.admin("/healthz"))[:2], (200, b"ok\n"))
        code, body, _ = await self.admin("/readyz")
        self.assertEqual((code, body), (200, b"ready\n"))
        code, body, _ = await self.admin("/")
        self.assertIn(b"/metrics", body)



class NotReadyTests(ServedEdgeTestCase):
    origin_base = f"http://127.0.0.1:{free_port()}/"  # nothing listens there

    async def test_readyz_says_why_not(self) -> None:
        code, body, _ = await self.admin("/readyz")
        self.assertEqual(code, 503)
        self.assertIn(f"no origin answers ({self.origin_base} down: unreachable".encode(), body)


class PurgeTests(ServedEdgeTestCase):
    extra = ("--admin-token=s3cret-token",)

    async def warm(self, *paths: str) -> None:
        for path in paths:
            self.origin.add(path.partition("?")[0], b"x" * 5000)
            self.assertEqual((await self.request(path))[0], 200)

    async def test_the_api_needs_the_token(self) -> None:
        await self.warm("/v/a.bin")
        code, body, response = await self.admin("/purge?path=/v/a.bin", "POST")
        self.assertEqual(code, 401)
        self.assertEqual(response.headers.getRawHeaders("WWW-Authenticate"), ['Bearer realm="h264edge"'])
        code, _, _ = await self.admin("/purge?path=/v/a.bin", "POST", {"Authorization": "Bearer wrong"})
        self.assertEqual(code, 403)
        code, body, _ = await self.admin("/purge?path=/v/a.bin", "POST", {"Authorization": "Bearer s3cret-token"})
        self.assertEqual((code, body), (200, b'{\n "purged": 1,\n "path": "/v/a.bin"\n}\n'))
        self.assertEqual((await self.request("/v/a.bin"))[2].headers.getRawHeaders("X-Cache"), ["MISS"])

    async def test_a_path_takes_its_query_variants_and_a_prefix_takes_everything_under_it(self) -> None:
        await self.warm("/v/a.bin", "/v/a.bin?lang=en", "/v/a.bin?lang=fr", "/v/b.bin", "/w/c.bin")
        token = {"Authorization": "Bearer s3cret-token"}
        code, body, _ = await self.admin("/purge?path=/v/a.bin", "POST", token)
        self.assertIn(b'"purged": 3', body)
        code, body, _ = await self.admin("/purge?prefix=/v/", "POST", token)
        self.assertIn(b'"purged": 1', body)
        code, body, _ = await self.admin("/purge?prefix=/v/", "POST", token)
        self.assertIn(b'"purged": 0', body)
        self.assertEqual((await self.request("/w/c.bin"))[2].headers.getRawHeaders("X-Cache"), ["HIT"])
        for bad in ("/purge", "/purge?path=/a&prefix=/b", "/purge?prefix=v/", "/purge?path=/../x"):
            self.assertEqual((await self.admin(bad, "POST", token))[0], 400, bad)
        found = await self.scrape()
        self.assertEqual(value(found, "h264edge_purged_objects_total", via="admin"), 4)

    async def test_paths_and_prefixes_beyond_ascii(self) -> None:
        """
        The API takes a path as text (its query decodes it: C{h264edge purge /v/€.bin} sends
        C{path=/v/%E2%82%AC.bin}), percent-encoded or not: /v/€.bin is the object the viewer asked
        for at /v/%E2%82%AC.bin (a 500 before), and the prefix /vidéos/ takes what lies under
        /vid%C3%A9os/ (it purged nothing before).
        """
        await self.warm("/v/%E2%82%AC.bin", "/v/%C3%A9.bin", "/vid%C3%A9os/a.bin", "/vid%C3%A9os/b.bin",
                        "/vid%C3%A9os/c.bin")
        token = {"Authorization": "Bearer s3cret-token"}
        for target in ("/v/%E2%82%AC.bin", "/v/%25C3%25A9.bin"):  # decoded: /v/€.bin, /v/%C3%A9.bin
            code, body, _ = await self.admin(f"/purge?path={target}", "POST", token)
            self.assertEqual((code, b'"purged": 1' in body), (200, True), (target, body))
        code, body, _ = await self.admin("/purge?prefix=/vid%C3%A9os/a", "POST", token)
        self.assertEqual((code, b'"purged": 1' in body), (200, True), body)
        code, body, _ = await self.admin("/purge?prefix=/vid%25C3%25A9os/", "POST", token)
        self.assertEqual((code, b'"purged": 2' in body), (200, True), body)
        for path in ("/v/%E2%82%AC.bin", "/v/%C3%A9.bin", "/vid%C3%A9os/b.bin"):
            self.assertEqual((await self.request(path))[2].headers.getRawHeaders("X-Cache"), ["MISS"], path)
        code, body, _ = await self.admin("/purge?prefix=/%25FF/", "POST", token)  # decoded: /%FF/, not UTF-8
        self.assertEqual(code, 400, body)

    async def test_a_seek_after_a_purge_is_a_miss(self) -> None:
        if not have_ffmpeg():
            raise SkipTest("ffmpeg is not installed")
        with open(clip("av_faststart.mp4"), "rb") as f:
            self.origin.add("/s.mp4", f.read(), content_type="video/mp4")
        self.assertEqual((await self.request("/s.mp4?start=4"))[0], 200)
        self.assertEqual((await self.request("/s.mp4?start=4"))[2].headers.getRawHeaders("X-Cache"), ["HIT"])
        await self.admin("/purge?path=/s.mp4", "POST", {"Authorization": "Bearer s3cret-token"})
        before = self.origin.requests
        self.assertEqual((await self.request("/s.mp4?start=4"))[2].headers.getRawHeaders("X-Cache"), ["MISS"])
        self.assertGreater(self.origin.requests, before)

    async def test_viewer_purge_needs_the_token_too(self) -> None:
        await self.warm("/p.bin")
        self.assertEqual((await self.request("/p.bin", "PURGE"))[0], 401)
        self.assertEqual((await self.request("/p.bin", "PURGE", headers={"Authorization": "Bearer no"}))[0], 403)
        code, body, _ = await self.request("/p.bin", "PURGE", headers={"Authorization": "Bearer s3cret-token"})
        self.assertEqual((code, body), (200, b"purged /p.bin\n"))


class TrustedProxyTests(ServedEdgeTestCase):
    extra = ("--trusted-proxy=127.0.0.0/8",)

    async def test_a_client_behind_a_trusted_proxy_is_not_loopback(self) -> None:
        self.origin.add("/t.bin", b"t" * 100)
        await self.request("/t.bin")
        code, body, _ = await self.request("/t.bin", "PURGE", headers={"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(code, 403)
        code, _, _ = await self.request("/t.bin", "PURGE", headers={"X-Forwarded-For": "127.0.0.1, 203.0.113.9"})
        self.assertEqual(code, 403)  # what the proxy appended counts, not what the client claimed before it
        code, _, _ = await self.request("/t.bin", "PURGE", headers={"X-Forwarded-For": "127.0.0.1"})
        self.assertEqual(code, 200)


    async def test_every_x_forwarded_for_line_counts(self) -> None:
        """
        A proxy may add an X-Forwarded-For line of its own (HAProxy does) rather than append to the
        one it got: a viewer two trusted proxies away is still the one judged, not the last proxy.
        """
        self.origin.add("/l.bin", b"l" * 100)
        await self.request("/l.bin")
        lines: Any = {"X-Forwarded-For": ["203.0.113.9", "127.0.0.2"]}
        code, _, _ = await self.request("/l.bin", "PURGE", headers=lines)
        self.assertEqual(code, 403)


class UntrustedProxyTests(ServedEdgeTestCase):
    async def test_x_forwarded_for_is_ignored_from_other_peers(self) -> None:
        self.origin.add("/u.bin", b"u" * 100)
        await self.request("/u.bin")
        code, _, _ = await self.request("/u.bin", "PURGE", headers={"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(code, 200)  # the peer is loopback and not a trusted proxy


class WorkersMetricsTests(TestCase):
    timeout = 120

    async def test_every_process_is_counted(self) -> None:
        origin = MemoryOrigin()
        origin_url = serve_origin(self, origin)
        origin.add("/w.bin", b"w" * 2000)
        port, admin_port = free_port(), free_port()
        workdir = os.path.abspath(self.mktemp())
        edge = RunningEdge(workdir, [f"--origin={origin_url}", f"--cache-dir={workdir}/cache", "--workers=2",
                                     f"--listen=tcp:{port}:interface=127.0.0.1",
                                     f"--admin-listen=tcp:{admin_port}:interface=127.0.0.1"], port)
        self.addCleanup(edge.stop)
        await edge.start()
        await edge.wait_for_log("cache index loaded", count=2)  # the worker runs too
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = treq.client.HTTPClient(Agent(reactor, pool=pool))
        served: dict[str, int] = {}
        for _ in range(200):  # bounded: until both processes answered
            response = await client.get(f"http://127.0.0.1:{port}/w.bin")
            await response.content()
            pid = response.headers.getRawHeaders("X-Served-By")[0]
            served[pid] = served.get(pid, 0) + 1
            if len(served) == 2 and min(served.values()) >= 2:
                break
        self.assertEqual(len(served), 2, served)
        total = sum(served.values())
        found: dict[Any, float] = {}

        async def summed() -> bool:
            response = await client.get(f"http://127.0.0.1:{admin_port}/metrics")
            found.clear()
            found.update(samples((await response.content()).decode()))
            return sum(v for (name, _), v in found.items() if name == "h264edge_requests_total") == total

        for _ in range(60):  # workers write their tallies every second
            if await summed():
                break
            await sleep(0.1)
        self.assertEqual(sum(v for (name, _), v in found.items() if name == "h264edge_requests_total"), total)
        self.assertEqual(value(found, "h264edge_sent_bytes_total", cache="HIT")
                         + value(found, "h264edge_sent_bytes_total", cache="MISS"), 2000 * total)
        self.assertEqual(value(found, "h264edge_open_connections"), 0)
        metrics_dirs = [line for line in edge.log().splitlines() if "h264edge-metrics-" in line]
        edge.signal(signal.SIGTERM)
        await edge.wait_exit(30)
        del metrics_dirs


class PurgeRulesTests(SynchronousTestCase):
    """The pure rules: bearer tokens, X-Forwarded-For, who may purge."""

    def test_bearer_grammar(self) -> None:
        self.assertEqual(bearer_token("Bearer abc-._~+/=="), "abc-._~+/==")
        self.assertEqual(bearer_token("bearer  t0k"), "t0k")
        for bad in (None, "", "Bearer", "Bearer ", "Basic abc", "Bearer a b", "Bearer a=b", "Bearer \x00"):
            self.assertIsNone(bearer_token(bad), bad)

    def test_forwarded_client(self) -> None:
        trusted = parse_networks(["10.0.0.0/8", "127.0.0.1"])
        self.assertEqual(forwarded_client("192.0.2.1", "127.0.0.1", trusted), "192.0.2.1")  # untrusted peer
        self.assertEqual(forwarded_client("10.1.1.1", "198.51.100.7, 10.2.2.2", trusted), "198.51.100.7")
        self.assertEqual(forwarded_client("10.1.1.1", "127.0.0.1, 198.51.100.7", trusted), "198.51.100.7")
        self.assertEqual(forwarded_client("10.1.1.1", None, trusted), "10.1.1.1")
        self.assertEqual(forwarded_client("10.1.1.1", "[2001:db8::1]:443", trusted), "2001:db8::1")
        self.assertEqual(forwarded_client("10.1.1.1", "198.51.100.7:5000", trusted), "198.51.100.7")
        self.assertIsNone(forwarded_client("10.1.1.1", "127.0.0.1, junk", trusted))
        self.assertIsNone(forwarded_client("10.1.1.1", "", trusted))
        self.assertEqual(forwarded_client("::ffff:10.1.1.1", "198.51.100.7", trusted), "198.51.100.7")

    def test_who_may_purge(self) -> None:
        open_auth = PurgeAuth()
        self.assertIsNone(open_auth.refusal("127.0.0.1", None, None, viewer_listener=True))
        self.assertEqual(open_auth.refusal("192.0.2.1", None, None, viewer_listener=True)[0], 403)  # type: ignore[index]
        self.assertEqual(open_auth.refusal("192.0.2.1", None, None, viewer_listener=False)[0], 403)  # type: ignore[index]
        token = PurgeAuth(token="t")
        self.assertEqual(token.refusal("127.0.0.1", None, None, True)[0], 401)  # type: ignore[index]
        self.assertEqual(token.refusal("127.0.0.1", None, "Bearer x", True)[0], 403)  # type: ignore[index]
        self.assertIsNone(token.refusal("127.0.0.1", None, "Bearer t", True))
        self.assertIsNone(token.refusal("192.0.2.1", None, "Bearer t", False))  # the admin API, remote, token
        self.assertEqual(token.refusal("192.0.2.1", None, "Bearer t", True)[0], 403)  # type: ignore[index]

    def test_any_header_text_gives_a_value_or_none(self) -> None:
        from hypothesis import given, strategies as st

        trusted = parse_networks(["127.0.0.0/8"])

        @given(st.text(max_size=300))
        def check(text: str) -> None:
            self.assertIn(type(bearer_token(text)), (str, type(None)))
            client = forwarded_client("127.0.0.1", text, trusted)
            self.assertIn(type(client), (str, type(None)))

        check()


class ReadinessRulesTests(SynchronousTestCase):
    def test_an_index_still_loading_and_an_unwritable_directory_are_named(self) -> None:
        from types import SimpleNamespace

        from twisted.internet.defer import Deferred

        from h264edge.metrics import OriginRecord
        from h264edge.web.admin import ReadyPage

        up = OriginRecord()
        up.ok_at = 1.0
        metrics: Any = SimpleNamespace(origins={"http://o/": up})
        blocker = self.mktemp()
        open(blocker, "w").close()
        store = SimpleNamespace(loading=True, root=os.path.join(blocker, "cache"))
        page = ReadyPage(store, SimpleNamespace(bases=["http://o/"]), metrics, clock=SimpleNamespace(seconds=lambda: 0))
        problems = self.successResultOf(Deferred.fromCoroutine(page.problems()))
        self.assertEqual(problems, ["the cache index is still loading",
                                    "the cache directory takes no new file (Not a directory)"])
