"""`h264edge demo --check`: the newcomer's first command, end to end with ffmpeg and ffprobe."""

import os
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.media import have_ffmpeg


class DemoTests(SynchronousTestCase):
    def test_demo_serves_seekable_samples(self) -> None:
        if not have_ffmpeg():
            raise SkipTest("ffmpeg is not installed (apt-get install -y ffmpeg)")
        directory = os.path.abspath(self.mktemp())
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        for run in ("cold", "warm"):
            result = subprocess.run(
                [sys.executable, "-m", "h264edge.cli", "demo", "--check", "--port", "0", "--dir", directory],
                capture_output=True, text=True, env=env, timeout=300,
            )
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            checks = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
            self.assertEqual(len(checks), 5, result.stdout)
            self.assertTrue(all(line.startswith("ok") for line in checks), result.stdout)
            if run == "warm":
                self.assertTrue(all(" HIT " in line for line in checks), result.stdout)
