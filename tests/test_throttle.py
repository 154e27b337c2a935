"""
Pacing answers (--limit-rate, --mp4-limit-rate): the rate a viewer's socket sees after the burst is
within 10% of the target, the fill from the origin is not paced, a viewer who leaves early pulled
only what it read; and the pacing rules themselves.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from h264edge.web.producer import Throttle, ThrottlePolicy
from tests.edgekit import random_bytes
from tests.media import clip, ffprobe_json, have_ffmpeg
from tests.running import until
from tests.served import ServedEdgeTestCase


class Receiver:
    """A viewer on a real socket reading one answer as fast as it can, noting when each byte arrived."""

    def __init__(self, port: int, path: str) -> None:
        self.port, self.path = port, path
        self.got = 0  # body bytes so far (read by the test's reactor thread)
        self.arrivals: list[tuple[float, int]] = []
        self.length = 0

    def run(self, stop_after: float = 0.0) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: edge\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            head, _, body = head.partition(b"\r\n\r\n")
            self.length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")))
            began = time.monotonic()
            self.got = len(body)
            self.arrivals.append((began, self.got))
            while self.got < self.length:
                if stop_after and time.monotonic() - began > stop_after:
                    return
                data = sock.recv(65536)
                if not data:
                    raise EOFError(f"short body: {self.got} of {self.length}")
                self.got += len(data)
                self.arrivals.append((time.monotonic(), self.got))

    def rate_after(self, burst: int) -> tuple[float, float]:
        """(bytes/s from the first moment C{burst} bytes had arrived to the end, seconds that took)."""
        t0, at = next((t, n) for t, n in self.arrivals if n >= burst)
        t1, end = self.arrivals[-1]
        return (end - at) / (t1 - t0), t1 - t0


class PlainRateTests(ServedEdgeTestCase):
    extra = ("--limit-rate=600K", "--limit-rate-after=300K", "--max-size=64M")

    async def test_after_the_burst_the_rate_is_the_limit_and_the_fill_is_not_paced(self) -> None:
        size = 1_600_000
        self.origin.add("/file.bin", random_bytes(size))
        viewer = Receiver(self.port, "/file.bin")
        done = deferToThread(viewer.run)
        # the origin sends the whole object while the viewer is still far from it
        await until(lambda: self.origin.bytes_sent >= size, 10)
        self.assertLess(viewer.got, 0.6 * size)
        await done
        rate, seconds = viewer.rate_after(300 * 1024)
        self.assertGreater(seconds, 1.5)
        target = 600 * 1024
        self.assertLessEqual(abs(rate - target) / target, 0.10, f"{rate:.0f} B/s against {target} B/s")
        # a hit is paced the same way (sendfile runs end where the allowance does)
        viewer = Receiver(self.port, "/file.bin")
        await deferToThread(viewer.run)
        rate, _ = viewer.rate_after(300 * 1024)
        self.assertLessEqual(abs(rate - target) / target, 0.10, f"a hit: {rate:.0f} B/s against {target} B/s")

    async def test_a_viewer_who_leaves_early_pulled_a_fraction(self) -> None:
        size = 3_000_000
        self.origin.add("/long.bin", random_bytes(size, seed=4))
        await self.request("/long.bin", "HEAD")  # cached head first: the answer starts at once
        viewer = Receiver(self.port, "/long.bin")
        await deferToThread(viewer.run, 0.5)
        found: dict[Any, float] = {}

        async def logged() -> bool:
            found.update(await self.scrape())
            return sum(v for (name, _), v in found.items() if name == "h264edge_cut_answers_total") == 1

        await until(lambda: True)
        for _ in range(100):
            if await logged():
                break
        sent = sum(v for (name, labels), v in found.items() if name == "h264edge_sent_bytes_total")
        # the burst and about half a second's worth (and a little the kernel took), not the file
        self.assertLess(sent, 300 * 1024 + 1.5 * 600 * 1024)
        self.assertGreaterEqual(sent, 300 * 1024)


class MP4RateTests(ServedEdgeTestCase):
    extra = ("--mp4-limit-rate=8", "--mp4-limit-rate-after=4", "--limit-rate=10K")

    async def test_the_rate_is_a_factor_of_the_clips_bitrate(self) -> None:
        if not have_ffmpeg():
            raise SkipTest("ffmpeg is not installed")
        path = clip("av_faststart.mp4")
        data = path.read_bytes()
        duration = float(ffprobe_json(path, "-show_entries", "format=duration")["format"]["duration"])
        bitrate = len(data) / duration
        self.origin.add("/clip.mp4", data, content_type="video/mp4")
        viewer = Receiver(self.port, "/clip.mp4")
        await deferToThread(viewer.run)
        self.assertEqual(viewer.got, len(data))
        rate, seconds = viewer.rate_after(int(4 * bitrate))
        target = 8 * bitrate
        self.assertGreater(seconds, 1.0)
        self.assertLessEqual(abs(rate - target) / target, 0.10, f"{rate:.0f} B/s against {target:.0f} B/s")
        # a seek answer is paced at the same clip's bitrate
        seek = Receiver(self.port, "/clip.mp4?start=6")
        await deferToThread(seek.run)
        rate, _ = seek.rate_after(int(4 * bitrate))
        self.assertLessEqual(abs(rate - target) / target, 0.10, f"a seek: {rate:.0f} B/s against {target:.0f} B/s")


class ThrottleRuleTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        throttle = Throttle(1000.0, 5000)
        self.assertEqual(throttle.allowance(0, 10.0), 5000)
        self.assertEqual(throttle.allowance(4000, 10.0), 1000)
        self.assertEqual(throttle.allowance(5000, 10.0), 0)  # pacing starts here
        self.assertEqual(throttle.allowance(5000, 10.5), 500)
        self.assertEqual(throttle.allowance(5400, 11.0), 600)
        self.assertEqual(throttle.allowance(6000, 11.0), 0)

    def test_an_unknown_rate_holds_nothing_back_and_pacing_starts_from_what_went(self) -> None:
        throttle = Throttle()
        self.assertIsNone(throttle.allowance(10_000_000, 1.0))
        throttle.rate, throttle.burst = 1000.0, 5000
        self.assertEqual(throttle.allowance(20_000, 2.0), 0)
        self.assertEqual(throttle.allowance(20_000, 3.0), 1000)

    def test_policy_picks_by_kind(self) -> None:
        from twisted.internet.defer import succeed

        obj: Any = object()
        policy = ThrottlePolicy(rate=100, rate_after=10, mp4_factor=2.0, mp4_after=3.0,
                                bitrate_of=lambda o, p: succeed(50_000.0))
        plain = policy.throttle_for(b"/a.bin", {"k": obj}, {"k": "/a.bin"})
        self.assertEqual((plain.rate, plain.burst), (100.0, 10))  # type: ignore[union-attr]
        mp4 = policy.throttle_for(b"/a.MP4?start=3", {"k": obj}, {"k": "/a.mp4"})
        self.assertEqual((mp4.rate, mp4.burst), (100_000.0, 150_000))  # type: ignore[union-attr]
        unreadable = ThrottlePolicy(rate=100, rate_after=10, mp4_factor=2.0, bitrate_of=lambda o, p: succeed(None))
        fallback = unreadable.throttle_for(b"/b.mp4", {"k": obj}, {"k": "/b.mp4"})
        self.assertEqual((fallback.rate, fallback.burst), (100.0, 10))  # type: ignore[union-attr]
        self.assertIsNone(ThrottlePolicy().throttle_for(b"/a.mp4", {"k": obj}, {"k": "/a.mp4"}))

    def test_a_moov_claiming_a_tiny_bitrate_does_not_hang_the_viewer(self) -> None:
        """
        A lying moov (timescale 1: a 1.8 MB clip of 20,000 s, 90 bytes/s) paced its viewers at 90 bytes/s
        with --mp4-limit-rate, a hang in all but name: the pace has a floor of MIN_MP4_PACE.
        """
        from twisted.internet.defer import succeed

        from h264edge.web.producer import MIN_MP4_PACE

        obj: Any = object()
        policy = ThrottlePolicy(mp4_factor=1.25, mp4_after=30.0, bitrate_of=lambda o, p: succeed(90.0))
        paced = policy.throttle_for(b"/liar.mp4", {"k": obj}, {"k": "/liar.mp4"})
        assert paced is not None
        self.assertEqual((paced.rate, paced.burst), (MIN_MP4_PACE, int(MIN_MP4_PACE * 30)))
        real = ThrottlePolicy(mp4_factor=1.25, mp4_after=30.0, bitrate_of=lambda o, p: succeed(250_000.0))
        paced = real.throttle_for(b"/real.mp4", {"k": obj}, {"k": "/real.mp4"})
        assert paced is not None
        self.assertEqual((paced.rate, paced.burst), (312_500.0, 7_500_000))  # a real clip: as configured
