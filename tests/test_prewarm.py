"""
`h264edge prewarm` and `h264edge purge` against a running edge: clips pulled in (whole, ranges,
seeks) with a rich progress bar and a summary, non-zero exit on errors; purges through the admin API.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from h264edge.prewarm import Pull, read_list
from tests.edgekit import random_bytes
from tests.media import clip, have_ffmpeg
from tests.running import child_env
from tests.served import ServedEdgeTestCase


def h264edge(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "h264edge.cli", *args], capture_output=True, text=True,
                          env=child_env(COLUMNS="120"), timeout=120, input=stdin)


class PrewarmTests(ServedEdgeTestCase):
    extra = ("--admin-token=t0ken",)

    def list_file(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    async def test_it_pulls_clips_ranges_and_seeks_and_reports(self) -> None:
        if not have_ffmpeg():
            raise SkipTest("ffmpeg is not installed")
        self.origin.add("/a.bin", random_bytes(300_000, seed=1))
        self.origin.add("/b.bin", random_bytes(200_000, seed=2))
        self.origin.add("/c.mp4", clip("av_faststart.mp4").read_bytes(), content_type="video/mp4")
        urls = self.list_file(
            "# clips for tonight\n"
            "/a.bin\n"
            f"http://somewhere.example/b.bin   # a URL: its path is taken\n"
            "/c.mp4?start=6\n"
            "/c.mp4 bytes=0-99999\n"
            "/missing.bin\n"
        )
        edge = f"http://127.0.0.1:{self.port}"
        result = await deferToThread(h264edge, "prewarm", urls, "--edge", edge, "--concurrency", "2",
                                     "--progress", "always")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)  # the missing clip
        summary = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line) for line in result.stdout.splitlines()
                   if " clips, " in line]
        self.assertEqual(len(summary), 1, result.stdout)
        self.assertRegex(summary[0], r"^5 clips, \d+ bytes \([\d.]+ [KM]iB\): 0 hits, 4 misses, 1 errors$")
        self.assertIn("error: /missing.bin: 404 Not Found", result.stdout)
        # the progress bar: clips done of all, bytes, rate, time left
        self.assertIn("clips", result.stdout)
        self.assertIn("5/5", result.stdout)
        self.assertRegex(result.stdout, r"[\d.]+ (bytes|[kMG]B)/s")
        self.assertIn("━", result.stdout)
        # now they are cached: every one a hit
        urls = self.list_file("/a.bin\n/b.bin\n/c.mp4?start=6\n/c.mp4 bytes=0-99999\n")
        result = await deferToThread(h264edge, "prewarm", urls, "--edge", edge, "--progress", "never")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("4 clips, ", result.stdout)
        self.assertIn(": 4 hits, 0 misses, 0 errors", result.stdout)
        self.assertNotIn("━", result.stdout)

    async def test_connection_errors_count_and_a_bad_list_is_refused(self) -> None:
        urls = self.list_file("/x.bin\n")
        result = await deferToThread(h264edge, "prewarm", urls, "--edge", "http://127.0.0.1:1")
        self.assertEqual(result.returncode, 1)
        self.assertIn("1 clips, 0 bytes (0 B): 0 hits, 0 misses, 1 errors", result.stdout)
        self.assertIn("ConnectionRefusedError", result.stdout)
        bad = self.list_file("/ok.bin\nclip.mp4\n")
        result = await deferToThread(h264edge, "prewarm", bad, "--edge", "http://127.0.0.1:1")
        self.assertEqual(result.returncode, 2)
        self.assertIn("line 2: 'clip.mp4' is not a path", result.stderr)

    async def test_purge_command(self) -> None:
        self.origin.add("/v/a.bin", b"a" * 100)
        self.origin.add("/v/b.bin", b"b" * 100)
        await self.request("/v/a.bin")
        await self.request("/v/b.bin")
        token = self.list_file("t0ken\n")
        admin = f"http://127.0.0.1:{self.admin_port}"
        result = await deferToThread(h264edge, "purge", "--admin", admin, "/v/a.bin")
        self.assertEqual(result.returncode, 1)
        self.assertIn("/v/a.bin: 401 purging needs Authorization: Bearer TOKEN", result.stderr)
        result = await deferToThread(h264edge, "purge", "--admin", admin, "--token-file", token, "/v/a.bin")
        self.assertEqual((result.returncode, result.stdout), (0, "/v/a.bin: purged 1 objects\n"))
        result = await deferToThread(h264edge, "purge", "--admin", admin, "--token", "t0ken", "--prefix", "/v/")
        self.assertEqual((result.returncode, result.stdout), (0, "/v/: purged 1 objects\n"))


class ListTests(SynchronousTestCase):
    def test_lines(self) -> None:
        pulls = read_list(io.StringIO(
            "/a.mp4\n  # comment\n\nhttps://cdn.example/x/b.mp4?start=3  bytes=10-\n/c%20d.bin bytes=-500 # tail\n"))
        self.assertEqual(pulls, [Pull("/a.mp4"), Pull("/x/b.mp4?start=3", "bytes=10-"),
                                 Pull("/c%20d.bin", "bytes=-500")])

    def test_bad_lines_are_named(self) -> None:
        for text, message in (("/a b c\n", "line 1"), ("/a bytes=x\n", "line 1"), ("\n\nrel.mp4\n", "line 3")):
            with self.assertRaises(ValueError) as caught:
                read_list(io.StringIO(text))
            self.assertIn(message, str(caught.exception))
