"""
The edge's life under an operator, end to end with a real C{twistd -n h264edge}: SIGUSR1 and SIGHUP
keep it serving (log reopened, options reloaded), SIGTERM drains, the open-files limit is raised,
systemd socket activation works, and bad settings are refused at start with one line.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys

import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from h264edge.lifecycle import StartupRefused
from h264edge.tap import Options
from h264edge.testing import MemoryOrigin
from tests.edgekit import RawClient, random_bytes
from tests.running import TWISTD, RunningEdge, child_env, connects, free_port, serve_origin, sleep, until


class RunningEdgeTestCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.origin = MemoryOrigin()
        self.origin_url = serve_origin(self, self.origin)
        self.workdir = os.path.abspath(self.mktemp())
        self.cache_dir = os.path.join(self.workdir, "cache")
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=pool))

    async def run_edge(self, *args: str, origin: bool = True, **kwargs: object) -> RunningEdge:
        port = free_port()
        argv = [f"--cache-dir={self.cache_dir}", f"--listen=tcp:{port}:interface=127.0.0.1", *args]
        if origin:
            argv.insert(0, f"--origin={self.origin_url}")
        edge = RunningEdge(self.workdir, argv, port, **kwargs)  # type: ignore[arg-type]
        self.addCleanup(edge.stop)
        await edge.start()
        return edge

    async def get(self, edge: RunningEdge, path: str) -> tuple[int, bytes]:
        response = await self.client.get(f"http://127.0.0.1:{edge.port}{path}")
        return response.code, await response.content()


class SignalTests(RunningEdgeTestCase):
    async def test_usr1_reopens_the_access_log_and_keeps_serving(self) -> None:
        self.origin.add("/a.bin", b"a" * 1000)
        access = os.path.join(self.workdir, "access.log")
        edge = await self.run_edge(f"--access-log={access}")
        self.assertEqual(await self.get(edge, "/a.bin"), (200, b"a" * 1000))
        os.rename(access, access + ".1")  # what logrotate does before its postrotate
        edge.signal(signal.SIGUSR1)
        await edge.wait_for_log("log files reopened")
        self.assertEqual((await self.get(edge, "/a.bin"))[0], 200)
        await until(lambda: os.path.exists(access) and os.path.getsize(access) > 0)
        self.assertTrue(edge.alive)
        with open(access + ".1") as old, open(access) as new:
            self.assertEqual([len(old.read().splitlines()), len(new.read().splitlines())], [1, 1])

    async def test_hup_reloads_what_is_safe_and_names_what_needs_a_restart(self) -> None:
        second = MemoryOrigin()
        second_url = serve_origin(self, second)
        second.add("/only-on-b.bin", b"b" * 500)
        config = os.path.join(self.workdir, "edge.toml")
        os.makedirs(self.workdir, exist_ok=True)
        with open(config, "w") as f:
            f.write(f'origin = ["{self.origin_url}"]\nmax-size = "10M"\ndefault-ttl = 60\n')
        edge = await self.run_edge(f"--config={config}", origin=False)
        self.assertEqual((await self.get(edge, "/only-on-b.bin"))[0], 404)
        with open(config, "w") as f:
            f.write(f'origin = ["{second_url}"]\nmax-size = "20M"\ndefault-ttl = 60\nslice-size = "2M"\n')
        edge.signal(signal.SIGHUP)
        text = await edge.wait_for_log("reload: --slice-size")
        self.assertIn("reload: --max-size 10485760 -> 20971520", text)
        self.assertIn(f"reload: --origins ['{self.origin_url}'] -> ['{second_url}']", text)
        self.assertIn("needs a restart", text.split("reload: --slice-size")[1].splitlines()[0])
        self.assertNotIn("reload: --default-ttl", text)
        self.assertEqual(await self.get(edge, "/only-on-b.bin"), (200, b"b" * 500))
        # a file that no longer parses changes nothing and ends nothing
        with open(config, "w") as f:
            f.write("max-size = 'lots'\n")
        edge.signal(signal.SIGHUP)
        await edge.wait_for_log("reload refused, nothing changed")
        self.assertTrue(edge.alive)
        self.assertEqual((await self.get(edge, "/only-on-b.bin"))[0], 200)


    async def test_workers_get_the_signals_too(self) -> None:
        config = os.path.join(self.workdir, "edge.toml")
        os.makedirs(self.workdir, exist_ok=True)
        with open(config, "w") as f:
            f.write('max-size = "10M"\n')
        edge = await self.run_edge(f"--config={config}", "--workers=2")
        await edge.wait_for_log("worker 1 [")  # its first log line: it runs
        await edge.wait_for_log("cache index loaded", count=2)
        with open(config, "w") as f:
            f.write('max-size = "30M"\n')
        edge.signal(signal.SIGHUP)
        await edge.wait_for_log("reload: --max-size 10485760 -> 31457280", count=2)
        edge.signal(signal.SIGUSR1)
        text = await edge.wait_for_log("log files reopened", count=2)
        self.assertIn("[h264edge.tap#info] log files reopened", text.split("worker 1 [")[-1])
        self.assertTrue(edge.alive)


class DrainTests(RunningEdgeTestCase):
    async def test_sigterm_finishes_answers_in_flight_and_refuses_new_connections(self) -> None:
        body = random_bytes(1 << 20)
        self.origin.add("/slow.bin", body)
        self.origin.add("/small.bin", b"s" * 100)
        edge = await self.run_edge()
        assert edge.port is not None
        idle = RawClient(edge.port)
        self.addCleanup(idle.close)
        idle.send_get("/small.bin")
        self.assertEqual((await deferToThread(idle.read_response)).status, 200)
        self.origin.dribble = (16 * 1024, 0.05)  # ~3 s for the whole body
        response = await self.client.get(f"http://127.0.0.1:{edge.port}/slow.bin", unbuffered=True)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        await until(lambda: chunks)
        edge.signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", edge.port), timeout=1).close()
                return False
            except ConnectionRefusedError:
                return True

        await until(refused, 5)
        # the idle keep-alive connection was closed at once
        idle.sock.settimeout(5)
        self.assertEqual(await deferToThread(idle.sock.recv, 1), b"")
        await done
        self.assertEqual(b"".join(chunks), body)
        # twistd ends by re-raising the signal that stopped it (systemd counts that as a clean stop)
        self.assertEqual(await edge.wait_exit(20), -signal.SIGTERM)
        text = edge.log()
        self.assertRegex(text, r"draining: 1 answers in flight \(up to 30.0 s\), \d+ idle connections closed")
        self.assertIn('"GET /slow.bin HTTP/1.1" 200 1048576', text)  # logged although the listener had stopped

    async def test_drain_timeout_closes_what_is_left(self) -> None:
        body = random_bytes(1 << 20)
        self.origin.add("/slower.bin", body)
        edge = await self.run_edge("--drain-timeout=0.5")
        self.origin.dribble = (4 * 1024, 0.05)  # ~13 s for the whole body
        response = await self.client.get(f"http://127.0.0.1:{edge.port}/slower.bin", unbuffered=True)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        await until(lambda: chunks)
        edge.signal(signal.SIGTERM)
        self.assertEqual(await edge.wait_exit(10), -signal.SIGTERM)
        failure = None
        try:
            await done
        except Exception as e:
            failure = e
        self.assertIsNotNone(failure)  # cut short: Content-Length says so
        got = b"".join(chunks)
        self.assertLess(len(got), len(body))
        self.assertEqual(got, body[: len(got)])
        text = edge.log()
        self.assertIn("drain timeout: closing 1 connections", text)
        self.assertRegex(text, r'"GET /slower.bin HTTP/1.1" 200 \d+ "-" "-" cache=MISS time=\S+ ttfb=\S+ cut=1')


class LimitTests(RunningEdgeTestCase):
    async def test_open_files_soft_limit_is_raised_to_the_hard_limit(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard <= 256:
            raise SkipTest(f"the hard limit here is {hard}")

        def low_soft_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

        edge = await self.run_edge(preexec=low_soft_limit)
        text = await edge.wait_for_log("open files limit raised from 256 to ")
        assert edge.proc is not None
        with open(f"/proc/{edge.proc.pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max open files"))
        raised = int(line.split()[3])
        self.assertGreater(raised, 256)
        self.assertIn(f"open files limit raised from 256 to {raised}", text)


class SocketActivationTests(RunningEdgeTestCase):
    async def test_listens_on_the_socket_systemd_passes(self) -> None:
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            raise SkipTest("systemd-socket-activate is not installed (Debian: systemd)")
        self.origin.add("/sa.bin", b"x" * 3000)
        port = free_port()
        edge = RunningEdge(
            self.workdir,
            [f"--origin={self.origin_url}", f"--cache-dir={self.cache_dir}", "--listen=systemd:domain=INET:index=0"],
            port,
            prefix=[activate, "-l", f"127.0.0.1:{port}", "--fdname=viewers", "-E", "PYTHONPATH"],
        )
        self.addCleanup(edge.stop)
        edge.spawn()
        # systemd-socket-activate listens at once and starts the edge at the first connection
        await until(lambda: connects(port), 10)
        self.assertEqual(await self.get(edge, "/sa.bin"), (200, b"x" * 3000))
        await edge.wait_for_log("Execing")




class StartRefusalTests(SynchronousTestCase):
    """Bad settings end the start with one line naming the option, not a traceback or the whole help."""

    def twistd(self, *args: str) -> tuple[int, str]:
        result = subprocess.run(
            [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "h264edge", "--origin=http://127.0.0.1:1/", *args],
            capture_output=True, text=True, env=child_env(), timeout=60, cwd=self.mktemp_dir(),
        )
        return result.returncode, result.stdout + result.stderr

    def mktemp_dir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def assert_one_line(self, output: str, text: str) -> None:
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Usage:", output)
        lines = [line for line in output.splitlines() if text in line]
        self.assertEqual(len(lines), 1, output)

    def test_a_port_in_use(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            code, output = self.twistd(f"--cache-dir={self.mktemp_dir()}", f"--listen=tcp:{port}:interface=127.0.0.1")
        self.assertNotEqual(code, 0)
        self.assert_one_line(output, f"h264edge: --listen=tcp:{port}:interface=127.0.0.1: cannot listen: "
                                     "Address already in use")

    def test_a_bare_port_number(self) -> None:
        code, output = self.twistd(f"--cache-dir={self.mktemp_dir()}", "--listen=8080")
        self.assertNotEqual(code, 0)
        self.assert_one_line(output, "h264edge: --listen=8080 is not an endpoint description; did you mean "
                                     "--listen=tcp:8080?")

    def test_an_unwritable_cache_dir(self) -> None:
        blocker = os.path.join(self.mktemp_dir(), "a-file")
        open(blocker, "w").close()
        code, output = self.twistd(f"--cache-dir={blocker}/cache", "--listen=tcp:0")
        self.assertNotEqual(code, 0)
        self.assert_one_line(output, f"h264edge: --cache-dir: cache directory {blocker}/cache: cannot create it: "
                                     "Not a directory")

    def test_bad_values_name_their_option(self) -> None:
        cases = {
            ("--origin-timeout=-1",): "--origin-timeout must be a non-negative number, not '-1'",
            ("--origin-timeout=0",): "--origin-timeout must be more than 0 seconds",
            ("--drain-timeout=soon",): "--drain-timeout must be a non-negative number, not 'soon'",
            ("--max-size=512K",): "--max-size=524288 is smaller than one slice",
            ("--origin=http://",): "--origin='http://' has no host name",
            ("--origin=http://o:99999/",): "--origin='http://o:99999/': Port out of range",
            ("--origin=http://u:p@o/",): "--origin='http://u:p@o/': credentials in the URL are not sent",
            ("--listen=tcp:http",): "--listen=tcp:http:",
            ("--default-ttl=nan",): "--default-ttl must be a non-negative number, not 'nan'",
        }
        for args, text in cases.items():
            options = Options()
            options.parent = object()  # as twistd runs it
            with self.assertRaises(StartupRefused) as caught:
                options.parseOptions(["--origin=http://o/", *args])
            message = str(caught.exception)
            self.assertIn(text, message)
            self.assertTrue(message.startswith("h264edge: "), message)
            self.assertNotIn("\n", message)
            # on its own, the same check is a UsageError
            self.assertRaises(usage.UsageError, Options().parseOptions, ["--origin=http://o/", *args])
