"""
contrib/: the systemd units (checked by systemd-analyze, and their command line run under
systemd-socket-activate against a real origin) and the example config file they name.
"""

from __future__ import annotations

import os
import re
import shlex
import sys

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from h264edge.testing import MemoryOrigin
from tests.running import RunningEdge, connects, free_port, need_tool, serve_origin, until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRIB = os.path.join(ROOT, "contrib")


def unit(name: str) -> dict[str, list[str]]:
    """The settings of a unit file (section.Key -> values), continuation lines joined."""
    settings: dict[str, list[str]] = {}
    section = ""
    with open(os.path.join(CONTRIB, name)) as f:
        text = f.read().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings




class UnitTests(SynchronousTestCase):
    def test_the_service_is_locked_down(self) -> None:
        import subprocess

        analyze = need_tool("systemd-analyze", "apt-get install -y systemd")
        result = subprocess.run([analyze, "security", "--offline=yes", os.path.join(CONTRIB, "h264edge.service")],
                                capture_output=True, text=True, timeout=60)
        match = re.search(r"Overall exposure level for h264edge\.service: (\d+\.\d+)", result.stdout + result.stderr)
        self.assertIsNotNone(match, result.stdout + result.stderr)
        assert match is not None
        self.assertLessEqual(float(match.group(1)), 3.0)

    def test_both_units_verify(self) -> None:
        import subprocess

        analyze = need_tool("systemd-analyze", "apt-get install -y systemd")
        scratch = os.path.abspath(self.mktemp())
        os.makedirs(scratch)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        for name in ("h264edge.service", "h264edge.socket"):
            with open(os.path.join(CONTRIB, name)) as f:
                text = f.read().replace("/opt/h264edge/bin/twistd", twistd)
            with open(os.path.join(scratch, name), "w") as f:
                f.write(text)
        result = subprocess.run([analyze, "verify", os.path.join(scratch, "h264edge.service"),
                                 os.path.join(scratch, "h264edge.socket")], capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stderr.strip()), (0, ""))

    def test_what_the_issue_asks_of_the_service(self) -> None:
        service = unit("h264edge.service")
        self.assertTrue(service.get("Service.DynamicUser") == ["yes"] or "Service.User" in service)
        for key, value in (("Service.ProtectSystem", "strict"), ("Service.NoNewPrivileges", "yes"),
                           ("Service.LimitNOFILE", "1048576"), ("Service.Restart", "on-failure"),
                           ("Service.CacheDirectory", "h264edge"), ("Unit.Wants", "network-online.target"),
                           ("Service.KillMode", "mixed"), ("Unit.Requires", "h264edge.socket")):
            self.assertIn(value, service.get(key, []), key)
        self.assertIn("/var/cache/h264edge", service["Service.ReadWritePaths"][0].split())
        # the drain fits in the stop timeout
        self.assertGreater(int(service["Service.TimeoutStopSec"][0]), 30)
        socket_unit = unit("h264edge.socket")
        self.assertEqual(socket_unit["Socket.FileDescriptorName"], ["viewers"])


class UnitCommandTests(TestCase):
    timeout = 120

    async def test_the_service_command_serves_on_the_socket_systemd_passes(self) -> None:
        activate = need_tool("systemd-socket-activate", "apt-get install -y systemd")
        origin = MemoryOrigin()
        origin_url = serve_origin(self, origin)
        origin.add("/clip.bin", b"c" * 4000)
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "etc"))
        with open(os.path.join(CONTRIB, "h264edge.toml")) as f:
            config = f.read().replace("http://origin.example:8000/", origin_url)
        with open(os.path.join(workdir, "etc", "h264edge.toml"), "w") as f:
            f.write(config)
        service = unit("h264edge.service")
        command = shlex.split(service["Service.ExecStart"][0])
        self.assertEqual(command[:4], ["/opt/h264edge/bin/twistd", "--nodaemon", "--pidfile=", "h264edge"])
        args = [arg.replace("/etc/h264edge", f"{workdir}/etc").replace("/var/cache/h264edge", f"{workdir}/cache")
                .replace("/var/log/h264edge", workdir) for arg in command[4:]]
        port = free_port()
        edge = RunningEdge(workdir, args, port,
                           prefix=[activate, "-l", f"127.0.0.1:{port}", "--fdname=viewers", "-E", "PYTHONPATH"])
        self.addCleanup(edge.stop)
        edge.spawn()

        def fetch() -> bytes:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/clip.bin", timeout=30) as response:
                return bytes(response.read())

        await until(lambda: connects(port), 10)  # systemd-socket-activate listens (and starts the edge)
        self.assertEqual(await deferToThread(fetch), b"c" * 4000)
        await until(lambda: os.path.exists(os.path.join(workdir, "access.log")))
        with open(os.path.join(workdir, "access.log")) as f:
            self.assertIn('"GET /clip.bin HTTP/1.1" 200 4000', f.read())
