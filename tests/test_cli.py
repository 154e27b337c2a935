"""`h264edge demo --check`: the newcomer's first command, end to end with ffmpeg and ffprobe."""

import os
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.media import have_ffmpeg
from tests.running import child_env


class DemoTests(SynchronousTestCase):
    def test_demo_serves_seekable_samples(self) -> None:
        if not have_ffmpeg():
            raise SkipTest("ffmpeg is not installed (apt-get install -y ffmpeg)")
        directory = os.path.abspath(self.mktemp())
        env = child_env()
        for run in ("cold", "warm"):
            result = subprocess.run(
                [sys.executable, "-m", "h264edge.cli", "demo", "--check", "--port", "0", "--admin-port", "0", "--dir",
                 directory],
                capture_output=True, text=True, env=env, timeout=300,
            )
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            checks = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
            self.assertEqual(len(checks), 8, result.stdout)  # five answers, then /metrics, /status, /player
            self.assertTrue(all(line.startswith("ok") for line in checks), result.stdout)
            if run == "warm":
                self.assertTrue(all(" HIT " in line for line in checks[:5]), result.stdout)


def h264edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "h264edge.cli", *args], capture_output=True, text=True, env=child_env(),
                          timeout=60)


EPYTEXT = ("C{", "L{", "I{", "B{", "@param", "@ivar")


class CommandTests(SynchronousTestCase):
    def test_alone_it_prints_help_and_exits_2(self) -> None:
        result = h264edge()
        self.assertEqual(result.returncode, 2)
        for command in ("serve", "demo", "prewarm", "purge", "check-config"):
            self.assertIn(command, result.stdout)

    def test_version_is_h264edges(self) -> None:
        from h264edge import __version__

        result = h264edge("--version")
        self.assertEqual((result.returncode, result.stdout.strip()), (0, f"h264edge {__version__}"))

    def test_help_texts_have_no_epytext(self) -> None:
        for args in (["--help"], ["demo", "--help"], ["serve", "--help"], ["check-config", "--help"],
                     ["prewarm", "--help"], ["purge", "--help"]):
            result = h264edge(*args)
            self.assertEqual(result.returncode, 0, (args, result.stderr))
            self.assertGreater(len(result.stdout), 100, args)
            for markup in EPYTEXT:
                self.assertNotIn(markup, result.stdout, args)

    def test_an_unknown_command_is_a_usage_error(self) -> None:
        result = h264edge("frobnicate")
        self.assertEqual(result.returncode, 2)
        self.assertIn("invalid choice: 'frobnicate'", result.stderr)

    def test_check_config_says_ok_or_names_the_problem(self) -> None:
        cache = os.path.abspath(self.mktemp())
        good = h264edge("check-config", "--origin=http://o/", f"--cache-dir={cache}")
        self.assertEqual(good.returncode, 0, good.stderr)
        self.assertIn("configuration ok", good.stdout)
        self.assertIn("max-size = 10737418240", good.stdout)
        bad = h264edge("check-config", "--origin=http://o/", f"--cache-dir={cache}", "--max-size=1K")
        self.assertEqual(bad.returncode, 1)
        self.assertEqual(len(bad.stderr.strip().splitlines()), 1, bad.stderr)
        self.assertIn("--max-size=1024 is smaller than one slice", bad.stderr)
