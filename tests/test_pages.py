"""
The pages the edge serves, loaded in headless Chromium against a running edge: the admin listener's
/status (no console errors, its numbers those of /metrics) and the viewer listener's /player.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from tests.browser import Browser, chromium_path
from tests.edgekit import random_bytes
from tests.media import clip, have_ffmpeg
from tests.served import ServedEdgeTestCase, value


def assert_near(test: Any, actual: float, expected: float, tolerance: float) -> None:
    test.assertLessEqual(abs(actual - expected), tolerance, f"{actual} is not within {tolerance} of {expected}")


class BrowserTestCase(ServedEdgeTestCase):
    async def browse(self, url: str) -> Browser:
        chromium_path()  # skips without chromium (fails on CI)
        browser: Browser = await deferToThread(Browser)
        self.addCleanup(deferToThread, browser.close)
        await deferToThread(browser.open, url)
        return browser

    async def js(self, browser: Browser, expression: str, await_promise: bool = False) -> Any:
        return await deferToThread(browser.evaluate, expression, await_promise)


class StatusPageTests(BrowserTestCase):
    extra = ("--max-size=1M",)

    async def test_the_page_loads_cleanly_and_shows_what_metrics_say(self) -> None:
        self.origin.add("/popular.bin", random_bytes(20_000))
        self.origin.add("/big.bin", random_bytes(300_000, seed=2))
        metrics = self.top.metrics  # type: ignore[attr-defined]
        metrics.sample()
        for _ in range(4):
            await self.request("/popular.bin")
        await self.request("/big.bin")
        await self.request("/nothing-here.bin")
        self.origin.fail_code = 503
        await self.request("/broken.bin")
        self.origin.fail_code = None
        metrics.sample()

        browser = await self.browse(f"http://127.0.0.1:{self.admin_port}/status")
        await deferToThread(browser.wait_for, "document.body.dataset.ready === '1'")
        await self.js(browser, "statusPage.stop()")
        await self.js(browser, "statusPage.refresh()", await_promise=True)
        shown = await self.js(browser, """Object.fromEntries(
            ["requests", "hit-ratio", "sent-bytes", "origin-bytes", "cache-bytes", "cache-objects", "cache-max",
             "connections", "cut"].map((id) => [id, Number(document.getElementById(id).dataset.value)]))""")
        found = await self.scrape()
        requests = sum(v for (name, _), v in found.items() if name == "h264edge_requests_total")
        hits = sum(v for (name, labels), v in found.items()
                   if name == "h264edge_requests_total" and ("cache", "HIT") in labels)
        self.assertEqual(requests, 7)
        self.assertEqual(shown["requests"], requests)
        self.assertAlmostEqual(shown["hit-ratio"], hits / requests)
        self.assertEqual(shown["sent-bytes"], sum(v for (name, _), v in found.items()
                                                  if name == "h264edge_sent_bytes_total"))
        self.assertEqual(shown["origin-bytes"], value(found, "h264edge_origin_bytes_total", origin=self.origin_url))
        self.assertEqual(shown["cache-bytes"], value(found, "h264edge_cache_bytes"))
        self.assertEqual(shown["cache-objects"], value(found, "h264edge_cache_objects"))
        self.assertEqual(shown["cache-max"], 2**20)
        self.assertEqual(shown["connections"], value(found, "h264edge_open_connections"))
        self.assertEqual(shown["cut"], value(found, "h264edge_cut_answers_total"))

        tables = await self.js(browser, """Object.fromEntries(["top-requests", "top-bytes", "origins", "errors"].map(
            (id) => [id, [...document.querySelectorAll(`#${id} tbody tr`)].map(
                (tr) => [...tr.cells].map((td) => td.textContent))]))""")
        self.assertEqual(tables["top-requests"][0][:2], ["/popular.bin", "4"])
        self.assertEqual(tables["top-bytes"][0][0], "/big.bin")
        self.assertEqual(tables["origins"][0][:2], [self.origin_url, "down"])  # its last answer was a 503
        self.assertIn(f"{self.origin_url}: status_5xx", [row[2] for row in tables["errors"]])
        self.assertIn("503 for GET /broken.bin", [row[2] for row in tables["errors"]])  # the origin's, relayed
        lines = await self.js(browser, "document.querySelectorAll('#chart-throughput polyline').length")
        self.assertEqual(lines, 2)  # sent and from origins, between the two samples
        self.assertEqual(await self.js(browser, "document.getElementById('disk-bar').style.width"),
                         f"{100 * shown['cache-bytes'] / 2**20:.1f}%")
        self.assertEqual(browser.problems(), [])
        # every asset came from the edge itself
        self.assertEqual({url.split("/")[2] for url in browser.requested() if url.startswith("http")},
                         {f"127.0.0.1:{self.admin_port}"})


#: a minute at ~1 Mb/s, a keyframe every 2 s: the browser has not loaded 45 s in when it starts
PLAYER_CLIP = [
    "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
    "-t", "60", "-c:v", "libx264", "-preset", "ultrafast", "-g", "50", "-b:v", "1M", "-maxrate", "1M",
    "-bufsize", "1M", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart",
]
GOP = 2.0


class PlayerPageTests(BrowserTestCase):
    async def test_it_plays_and_a_seek_past_what_is_loaded_reloads_with_start(self) -> None:
        if not have_ffmpeg():
            raise SkipTest("ffmpeg is not installed")
        self.origin.add("/v/clip.mp4", clip("player.mp4", PLAYER_CLIP).read_bytes(), content_type="video/mp4")
        browser = await self.browse(f"http://127.0.0.1:{self.port}/player?src=/v/clip.mp4")
        await deferToThread(browser.wait_for, "player.time() > 1", 30)  # it plays
        state = await self.js(browser, "player.state()")
        assert_near(self, state["total"], 60.0, 0.1)
        loaded_to = max(end for _, end in state["buffered"])
        self.assertLess(loaded_to, 45, "the browser loaded the clip past the seek target: make it longer")
        self.assertEqual(await self.js(browser, "player.seek(45)"), "reload")
        await deferToThread(browser.wait_for, "player.state().resumedAt !== null", 30)
        state = await self.js(browser, "player.state()")
        self.assertIn(f"http://127.0.0.1:{self.port}/v/clip.mp4?start=45", browser.requested())
        self.assertEqual(state["src"], f"http://127.0.0.1:{self.port}/v/clip.mp4?start=45")
        # the answer starts on the keyframe at or before 45 s: playback resumes within a GOP of it
        self.assertGreaterEqual(state["resumedAt"], 45 - GOP)
        self.assertLessEqual(state["resumedAt"], 45 + 0.5)
        assert_near(self, state["offset"], 44.0, 0.1)  # keyframes every 2 s
        shown, now = await self.js(browser, "[Number(document.getElementById('time').dataset.value), player.time()]")
        assert_near(self, shown, now, 0.5)
        self.assertGreater(now, 44)
        label = await self.js(browser, "document.getElementById('time').textContent")
        self.assertRegex(label, r"^0:4\d\.\d / 1:00\.0$")
        self.assertEqual(browser.problems(), [])

    async def test_src_must_be_a_path_on_this_edge(self) -> None:
        for bad in ("", "?src=http://evil.example/x.mp4", "?src=//evil.example/x.mp4", "?src=/a/../b.mp4",
                    "?src=/x.mp4%22onload=%22alert(1)", "?src=/a.mp4&src=/b.mp4"):
            code, body, _ = await self.request("/player" + bad)
            self.assertEqual(code, 400, (bad, body))
        code, body, _ = await self.request("/player?src=/a%2520b.mp4%3Fx%3D1%26y%3D2")
        self.assertEqual(code, 200)
        self.assertIn(b'data-src="/a%20b.mp4?x=1&amp;y=2"', body)

    async def test_a_src_beyond_ascii_is_a_path_as_a_viewer_sends_it(self) -> None:
        """
        src is text (the query decodes it) whose characters are UTF-8, as in a request's path:
        /vidéos/€.mp4 is a path on this edge (a 400 before: its characters were taken as latin-1).
        """
        code, body, _ = await self.request("/player?src=/vid%C3%A9os/%E2%82%AC.mp4")
        self.assertEqual(code, 200, body)
        self.assertIn('data-src="/vidéos/€.mp4"'.encode(), body)
        code, body, _ = await self.request("/player?src=/%25FF.mp4")  # decoded: /%FF.mp4, not UTF-8
        self.assertEqual(code, 400, body)


class NoPlayerTests(ServedEdgeTestCase):
    extra = ("--no-player",)

    async def test_the_path_is_the_edges_again(self) -> None:
        self.origin.add("/player", b"an origin file called player")
        code, body, _ = await self.request("/player?src=/x.mp4")
        self.assertEqual((code, body), (200, b"an origin file called player"))
