"""
C{--workers}: several processes on one port and one cache directory, end to end under twistd, and
the pieces (options, worker command line, the pool's restart and stop) in process.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.server import Site
from twisted.web.resource import Resource

from h264edge.tap import Options
from h264edge.workers import LISTEN_FD, MAX_BACKOFF, MAX_QUICK_DEATHS, STOP_TIMEOUT, WorkerPool
from tests.engines import wait_for_port
from tests.running import child_env, free_port

DEADLINE = 60.0


def fetch(port: int, path: str) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("X-Served-By") or ""
    finally:
        conn.close()


def children_of(pid: int) -> set[int]:
    """Every live descendant of C{pid} (from /proc)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class EndToEndTests(SynchronousTestCase):
    """C{twistd -n h264edge --workers=2} against a static origin, both real processes on 127.0.0.1."""

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("reads /proc")
        self.dir = self.mktemp()
        os.makedirs(os.path.join(self.dir, "origin"))
        self.files = {f"/f{i}.bin": os.urandom(1000 + 7919 * i) for i in range(6)}
        for path, data in self.files.items():
            with open(os.path.join(self.dir, "origin", path[1:]), "wb") as f:
                f.write(data)
        self.env = child_env()
        self.procs: list[subprocess.Popen[bytes]] = []

    def tearDown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                for pid in children_of(proc.pid):
                    os.kill(pid, signal.SIGKILL)
                proc.kill()
            proc.wait()

    def start(self, *argv: str) -> subprocess.Popen[bytes]:
        with open(os.path.join(self.dir, f"log{len(self.procs)}"), "wb") as out:
            proc = subprocess.Popen(argv, env=self.env, cwd=self.dir, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        with open(os.path.join(self.dir, f"log{self.procs.index(proc)}"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def start_two_worker_edge(self) -> tuple[subprocess.Popen[bytes], int]:
        """A static origin and `twistd h264edge --workers=2` in front of it, both listening."""
        origin_port, edge_port = free_port(), free_port()
        origin = self.start(sys.executable, "-m", "twisted", "web", "--path", "origin",
                            "--listen", f"tcp:{origin_port}:interface=127.0.0.1")
        wait_for_port(origin_port, origin)
        edge = self.start(
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
            "h264edge", "--workers=2", f"--origin=http://127.0.0.1:{origin_port}/", "--cache-dir=cache",
            f"--listen=tcp:{edge_port}:interface=127.0.0.1",
        )
        wait_for_port(edge_port, edge)
        return edge, edge_port

    def test_two_processes_serve_one_port_and_stop_cleanly(self) -> None:
        edge, edge_port = self.start_two_worker_edge()
        served_by: set[str] = set()
        paths = list(self.files) * 4  # rounds of 24 requests, 8 at a time, each on its own connection
        with ThreadPoolExecutor(8) as pool:
            for _ in range(10):  # the worker starts a moment after the parent listens
                for path, (status, data, pid) in zip(paths, pool.map(lambda p: fetch(edge_port, p), paths)):
                    self.assertEqual(status, 200)
                    self.assertEqual(data, self.files[path])
                    served_by.add(pid)
                if len(served_by) > 1:
                    break
                time.sleep(0.5)
        workers = children_of(edge.pid)
        self.assertEqual(len(workers), 1, workers)
        self.assertEqual(served_by, {str(edge.pid)} | {str(pid) for pid in workers})

        edge.send_signal(signal.SIGTERM)
        # twistd stops its services, then ends by the signal it got (so the status is -SIGTERM)
        self.assertIn(edge.wait(timeout=DEADLINE), (0, -signal.SIGTERM))
        self.assertIn("Server Shut Down.", self.output(edge))
        deadline = time.monotonic() + STOP_TIMEOUT + 5
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual([pid for pid in workers if alive(pid)], [])
        self.assertIn("worker 1 [", self.output(edge))  # the worker's log reached the parent's

    def test_a_purge_in_one_process_reaches_the_others_hot_answers(self) -> None:
        edge, edge_port = self.start_two_worker_edge()
        path = "/f3.bin"
        old = self.files[path]
        self.wait_for_workers(edge.pid, set())
        answers: dict[str, int] = {}
        deadline = time.monotonic() + DEADLINE
        for _ in range(600):  # bounded: until each process has answered it often enough to hold it in memory
            status, data, pid = fetch(edge_port, path)
            self.assertEqual((status, data), (200, old))
            answers[pid] = answers.get(pid, 0) + 1
            if len(answers) == 2 and min(answers.values()) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        self.assertEqual(len(answers), 2, answers)
        new = os.urandom(len(old) + 11)
        with open(os.path.join(self.dir, "origin", path[1:]), "wb") as f:
            f.write(new)
        conn = http.client.HTTPConnection("127.0.0.1", edge_port, timeout=30)
        try:
            conn.request("PURGE", path)
            self.assertEqual(conn.getresponse().status, 200)
        finally:
            conn.close()
        after: set[str] = set()
        for _ in range(30):
            status, data, pid = fetch(edge_port, path)
            self.assertEqual((status, data), (200, new))
            after.add(pid)
        self.assertEqual(len(after), 2, after)

    def test_a_killed_worker_is_replaced_and_the_parent_killed_takes_its_workers(self) -> None:
        edge, edge_port = self.start_two_worker_edge()
        first = self.wait_for_workers(edge.pid, set())
        os.kill(first.pop(), signal.SIGKILL)
        second = self.wait_for_workers(edge.pid, first)
        self.assertEqual(fetch(edge_port, "/f1.bin")[:2], (200, self.files["/f1.bin"]))
        edge.kill()  # no chance to stop its workers: the kernel tells them (PDEATHSIG)
        edge.wait()
        deadline = time.monotonic() + DEADLINE
        while any(alive(pid) for pid in second) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual([pid for pid in second if alive(pid)], [])

    def wait_for_workers(self, parent: int, old: set[int]) -> set[int]:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            current = children_of(parent)
            if len(current) == 1 and not current & old:
                return current
            time.sleep(0.1)
        raise AssertionError(f"no new worker under {parent}")


class WorkerOptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--origin=http://o/", *argv])
        return options

    def test_workers_default_to_one(self) -> None:
        self.assertEqual(self.parse()["workers"], 1)

    def test_workers_need_a_tcp_listen(self) -> None:
        self.assertRaises(usage.UsageError, self.parse, "--workers=2", "--listen=unix:/tmp/edge.sock")
        self.assertEqual(self.parse("--workers=2", "--listen=tcp:8080:interface=127.0.0.1")["tcp-listen"],
                         ("127.0.0.1", 8080, 50))

    def test_bad_worker_counts_are_usage_errors(self) -> None:
        for bad in ("0", "-1", "two", "1000"):
            self.assertRaises(usage.UsageError, self.parse, f"--workers={bad}")

    def test_worker_command_repeats_the_options_without_workers(self) -> None:
        options = self.parse("--workers", "3", "--cache-dir=/c", "--origin=http://p/", "--ignore-query")
        argv = options.worker_argv()
        self.assertEqual(argv[:3], [sys.executable, "-m", "twisted"])
        self.assertEqual(argv[argv.index("h264edge") + 1:],
                         ["--origin=http://o/", "--cache-dir=/c", "--origin=http://p/", "--ignore-query",
                          f"--listen-fd={LISTEN_FD}"])

    def test_listen_fd_is_accepted_and_not_in_the_help(self) -> None:
        self.assertEqual(self.parse("--listen-fd=3")["listen-fd"], 3)
        self.assertNotIn("listen-fd", str(Options()))
        self.assertIn("--workers", str(Options()))


class _FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _SpawningReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[int, Any]]] = []
        self.adopted: list[int] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None, path: Any = None,
                     uid: Any = None, gid: Any = None, usePTY: Any = False, childFDs: Any = None) -> Any:
        transport = _FakeTransport(1000 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append((protocol, args, childFDs))
        return transport

    def adoptStreamPort(self, fd: int, family: Any, factory: Any) -> Any:
        self.adopted.append(fd)
        return _FakePort()


class _FakePort:
    def stopListening(self) -> None:
        return None


class WorkerPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = _SpawningReactor()
        self.pool = WorkerPool("127.0.0.1", 0, Site(Resource()), ["python", "-m", "twisted", "h264edge"], 3,
                               reactor=self.reactor)
        self.pool.startService()
        self.addCleanup(lambda: self.pool.socket.close() if self.pool.socket else None)

    def end(self, index: int, code: int = 1) -> None:
        protocol = self.reactor.spawned[index][0]
        protocol.processEnded(Failure(error.ProcessTerminated(exitCode=code)))

    def test_parent_serves_and_spawns_the_other_workers_on_its_socket(self) -> None:
        self.assertEqual(len(self.reactor.adopted), 1)
        self.assertEqual(len(self.reactor.spawned), 2)
        for _, _, fds in self.reactor.spawned:
            self.assertEqual(fds[LISTEN_FD], self.pool.socket.fileno())  # type: ignore[union-attr]
            self.assertEqual((fds[1], fds[2]), ("r", "r"))

    def test_dead_worker_is_restarted_with_growing_backoff(self) -> None:
        self.end(0)
        self.reactor.advance(0.49)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.01)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.end(2)
        self.reactor.advance(0.5)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.reactor.advance(0.5)
        self.assertEqual(len(self.reactor.spawned), 4)

    def test_worker_that_keeps_dying_is_given_up(self) -> None:
        index = 0
        for _ in range(20):
            before = len(self.reactor.spawned)
            self.end(index)
            self.reactor.advance(MAX_BACKOFF)
            if len(self.reactor.spawned) == before:
                break
            index = before
        self.assertEqual(len(self.reactor.spawned), 2 + MAX_QUICK_DEATHS)
        self.assertEqual(len(self.pool.workers), 1)  # the other slot still runs

    def test_stop_terms_then_kills(self) -> None:
        d = self.pool.stopService()
        transports = [protocol.transport for protocol, _, _ in self.reactor.spawned]
        self.assertEqual([t.signals for t in transports], [["TERM"], ["TERM"]])
        self.end(0, code=0)
        self.reactor.advance(STOP_TIMEOUT)
        self.assertEqual([t.signals for t in transports], [["TERM"], ["TERM", "KILL"]])
        self.assertNoResult(d)
        self.end(1)
        self.successResultOf(d)
        self.reactor.advance(MAX_BACKOFF)
        self.assertEqual(len(self.reactor.spawned), 2)  # nothing restarted after stop
