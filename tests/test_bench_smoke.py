"""
The benchmark harness in its short smoke mode (`bench/run.py --quick`): every server starts, every
figure is measured for nginx and h264edge, every sampled answer decodes.  Skipped where nginx (Debian's
nginx-extras, for its mp4 module), wrk or ffmpeg are missing; the real comparison is `bench/run.py`.
"""

import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.running import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchSmokeTests(SynchronousTestCase):
    def test_quick_benchmark_measures_every_figure(self) -> None:
        missing = [tool for tool in ("nginx", "wrk", "ffmpeg")
                   if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}")]
        if missing:
            raise SkipTest(f"{', '.join(missing)} not installed (apt-get install -y nginx-extras wrk ffmpeg)")
        if os.geteuid() != 0:
            raise SkipTest("the harness runs nginx as root from a temp prefix")
        scratch = os.path.abspath(self.mktemp())
        os.makedirs(scratch)
        env = child_env(H264EDGE_BENCH_PYTHON=sys.executable)
        media = os.environ.get("H264EDGE_BENCH_MEDIA") or os.path.join(scratch, "media")
        report = os.path.join(scratch, "RESULTS-quick.md")
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--media", media, "--out", report],
            capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
        )
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        with open(report) as f:
            text = f.read()
        for figure in ("1a", "2", "3a", "4", "5a", "6b", "6c", "7a", "7b"):
            self.assertIn(f"| {figure} |", text)
        self.assertNotIn("ERROR", text)  # a figure that could not be measured


class HarnessDefaultsTests(SynchronousTestCase):
    def test_the_harness_runs_the_checkouts_venv(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "H264EDGE_BENCH_PYTHON"}
        result = subprocess.run([sys.executable, "-c", "import servers; print(servers.VENV_PYTHON)"],
                                capture_output=True, text=True, env=env, cwd=os.path.join(ROOT, "bench"), timeout=60)
        self.assertEqual(result.stdout.strip(), os.path.join(ROOT, ".venv", "bin", "python"), result.stderr)
