"""
Logs of a running edge: every answer in the access log (cut ones too, with the bytes that went, the
cache status and the time taken), combined or JSON lines; structured events (JSON, through
twisted.logger); and a real logrotate run with the shipped contrib/logrotate.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.server import NOT_DONE_YET

from h264edge.testing import MemoryOrigin
from tests.edgekit import RawClient, random_bytes
from tests.running import RunningEdge, free_port, need_tool, serve_origin, until
from tests.served import ServedEdgeTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMBINED = re.compile(
    r'(?P<client>\S+) - - \[[^]]+\] "(?P<method>\S+) (?P<uri>\S+) HTTP/1\.1" (?P<code>\d+) (?P<bytes>\d+) '
    r'"(?P<referer>[^"]*)" "(?P<agent>[^"]*)" cache=(?P<cache>\S+) time=(?P<time>\d+\.\d{3}) '
    r"ttfb=(?P<ttfb>\d+\.\d{3}|-) cut=(?P<cut>[01])"
)


class AccessLogTestCase(ServedEdgeTestCase):
    log_format = "combined"

    def setUp(self) -> object:
        self.access = os.path.abspath(self.mktemp())
        self.events = os.path.abspath(self.mktemp())
        self.extra = (f"--access-log={self.access}", f"--access-log-format={self.log_format}",
                      f"--event-log={self.events}", "--max-size=256K")
        return super().setUp()

    def lines(self) -> list[str]:
        with open(self.access) as f:
            return f.read().splitlines()

    async def cut_answer(self, path: str, size: int) -> int:
        """A viewer that reads some of C{path} and resets the connection; the body bytes it got."""
        self.origin.add(path, random_bytes(size, seed=3))
        self.origin.dribble = (8192, 0.02)
        viewer = RawClient(self.port)
        viewer.send_get(path)
        got = await deferToThread(viewer.read_some_then_close, 30_000, True)
        self.origin.dribble = None
        await until(lambda: any(path in line for line in self.lines()))
        return got


class CombinedLogTests(AccessLogTestCase):
    async def test_every_answer_is_a_line_with_cache_status_time_and_cut(self) -> None:
        self.origin.add("/a.bin", b"a" * 5000)
        await self.request("/a.bin", headers={"User-Agent": "probe/1", "Referer": "http://r/"})
        await self.request("/a.bin", "HEAD")
        await self.request("/missing.bin")
        got = await self.cut_answer("/cut.bin", 600_000)
        lines = self.lines()
        parsed = [COMBINED.fullmatch(line) for line in lines]
        self.assertTrue(all(parsed), lines)
        fields = [(m["method"], m["uri"], m["code"], m["cache"], m["cut"]) for m in parsed if m]
        self.assertEqual(fields, [("GET", "/a.bin", "200", "MISS", "0"), ("HEAD", "/a.bin", "200", "HIT", "0"),
                                  ("GET", "/missing.bin", "404", "BYPASS", "0"), ("GET", "/cut.bin", "200", "MISS", "1")])
        first, cut = parsed[0], parsed[3]
        assert first is not None and cut is not None
        self.assertEqual((first["bytes"], first["referer"], first["agent"], first["client"]),
                         ("5000", "http://r/", "probe/1", "127.0.0.1"))
        # what left the process: at least what the viewer read of the body, far less than the whole
        self.assertGreaterEqual(int(cut["bytes"]), got - 400)
        self.assertLess(int(cut["bytes"]), 600_000)
        self.assertGreater(float(cut["time"]), 0.0)

    async def test_a_viewer_gone_before_the_headers_is_499(self) -> None:
        self.origin.add("/late.bin", b"l" * 1000)
        answer_now = self.origin.render
        pending = []

        def answer_late(request: Any) -> Any:  # the origin takes 0.3 s to answer: the viewer leaves first
            pending.append(reactor.callLater(0.3, lambda: request.finished or _write(request, answer_now(request))))
            return NOT_DONE_YET

        self.origin.render = answer_late  # type: ignore[method-assign]
        viewer = RawClient(self.port)
        viewer.send_get("/late.bin")
        await until(lambda: pending)
        viewer.read_some_then_close(0, True)
        await until(lambda: any("/late.bin" in line for line in self.lines()))
        line = next(line for line in self.lines() if "/late.bin" in line)
        self.assertRegex(line, r'"GET /late.bin HTTP/1.1" 499 0 "-" "-" cache=- time=\S+ ttfb=- cut=1$')
        filler = self.top.resource.filler  # type: ignore[attr-defined]
        await until(lambda: not filler.busy)  # the late answer still fills the cache

    async def test_events_are_json_lines(self) -> None:
        self.origin.add("/e1.bin", random_bytes(150_000, seed=1))
        self.origin.add("/e2.bin", random_bytes(150_000, seed=2))
        await self.request("/e1.bin")
        await self.request("/e2.bin")  # 256K of cache: e1 is evicted
        self.origin.fail_code = 503
        await self.request("/down.bin")
        self.origin.fail_code = None
        await self.request("/e2.bin", "PURGE")
        with open(self.events) as f:
            events = [json.loads(line) for line in f]
        names = [event["h264edge_event"] for event in events]
        for name in ("fill", "eviction", "origin_error", "purge"):
            self.assertIn(name, names)
        fill = next(e for e in events if e["h264edge_event"] == "fill")
        self.assertEqual((fill["key"], fill["origin"], fill["log_namespace"]), ("/e1.bin", self.origin_url,
                                                                                "h264edge.events"))
        self.assertIsInstance(fill["log_time"], float)
        eviction = next(e for e in events if e["h264edge_event"] == "eviction")
        self.assertEqual((eviction["key"], eviction["bytes"]), ("/e1.bin", 150_000))
        error = next(e for e in events if e["h264edge_event"] == "origin_error")
        self.assertEqual((error["origin"], error["kind"]), (self.origin_url, "status_5xx"))
        purge = next(e for e in events if e["h264edge_event"] == "purge")
        self.assertEqual((purge["via"], purge["target"], purge["objects"]), ("viewer", "/e2.bin", 1))


class JSONLogTests(AccessLogTestCase):
    log_format = "json"

    async def test_json_lines_carry_the_same_fields(self) -> None:
        self.origin.add("/j.bin", b"j" * 3000)
        await self.request("/j.bin", headers={"User-Agent": "probe/2"})
        await self.request("/j.bin")
        got = await self.cut_answer("/jcut.bin", 600_000)
        entries = [json.loads(line) for line in self.lines()]
        self.assertEqual([(e["method"], e["uri"], e["status"], e["cache"], e["cut"]) for e in entries],
                         [("GET", "/j.bin", 200, "MISS", False), ("GET", "/j.bin", 200, "HIT", False),
                          ("GET", "/jcut.bin", 200, "MISS", True)])
        self.assertEqual((entries[0]["bytes"], entries[0]["user_agent"], entries[0]["client"]),
                         (3000, "probe/2", "127.0.0.1"))
        self.assertIsNone(entries[0]["referer"])
        self.assertRegex(entries[0]["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertGreaterEqual(entries[2]["bytes"], got - 400)
        self.assertLess(entries[2]["bytes"], 600_000)
        for entry in entries:
            self.assertGreaterEqual(entry["time_taken"], entry["ttfb"])


class LogrotateTests(ServedEdgeTestCase):
    async def test_the_shipped_logrotate_config_rotates_a_running_edge(self) -> None:
        logrotate = need_tool("logrotate", "apt-get install -y logrotate")
        workdir = os.path.abspath(self.mktemp())
        logs = os.path.join(workdir, "log")
        os.makedirs(logs)
        origin = MemoryOrigin()
        origin.add("/r.bin", b"r" * 2000)
        origin_url = serve_origin(self, origin)
        port = free_port()
        edge = RunningEdge(workdir, [f"--origin={origin_url}", f"--cache-dir={workdir}/cache",
                                     f"--listen=tcp:{port}:interface=127.0.0.1",
                                     f"--access-log={logs}/access.log", f"--event-log={logs}/events.log"], port)
        self.addCleanup(edge.stop)
        await edge.start()
        await self.request("/r.bin", port=port)
        await until(lambda: os.path.getsize(f"{logs}/access.log") > 0)
        with open(os.path.join(ROOT, "contrib", "logrotate")) as f:
            config = f.read()
        assert edge.proc is not None
        config = config.replace("/var/log/h264edge/", logs + "/")
        config = re.sub(r"systemctl kill [^\n]*", f"kill -USR1 {edge.proc.pid}", config)
        conf_path = os.path.join(workdir, "logrotate.conf")
        with open(conf_path, "w") as f:
            f.write(config)
        result = subprocess.run([logrotate, "-f", "-s", os.path.join(workdir, "state"), conf_path],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        await edge.wait_for_log("log files reopened")
        await self.request("/r.bin", port=port)
        await until(lambda: os.path.exists(f"{logs}/access.log") and os.path.getsize(f"{logs}/access.log") > 0)
        with open(f"{logs}/access.log.1") as old, open(f"{logs}/access.log") as new:
            self.assertEqual([len(old.read().splitlines()), len(new.read().splitlines())], [1, 1])
        self.assertTrue(os.path.exists(f"{logs}/events.log.1"))
        self.assertTrue(edge.alive)


def _write(request: Any, body: Any) -> None:
    if isinstance(body, bytes):
        request.write(body)
        request.finish()
