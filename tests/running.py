"""
A real C{twistd -n h264edge} in a child process, for tests of what an operator does to a running
edge (signals, config reloads, drains, the admin listener).  The test's own reactor keeps running
(origins live in the test process), so every wait here is a bounded poll on that reactor.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
START_DEADLINE = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child that imports this checkout's h264edge."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **extra)


def connects(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:C{port}."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def until(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll C{check} on the reactor until it returns something true; AssertionError after C{timeout}."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {check}")
        await sleep(interval)


class RunningEdge:
    """
    C{twistd -n --pidfile= h264edge ARGS}, its log (stdout and stderr) in C{log_path}.

    @ivar port: the viewer port, when the caller gave C{--listen=tcp:PORT:...} through L{start}.
    """

    def __init__(self, workdir: str, args: list[str], port: Optional[int] = None,
                 preexec: Optional[Callable[[], None]] = None, prefix: Optional[list[str]] = None) -> None:
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.args = args
        self.port = port
        self.log_path = os.path.join(workdir, "twistd.log")
        self.preexec = preexec
        self.prefix = prefix or []
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-c", TWISTD, "-n", "--pidfile=", "h264edge", *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=self.workdir,
                preexec_fn=self.preexec,
            )
        return self.proc

    async def start(self, wait_for: Optional[int] = None) -> None:
        """Spawn it and wait until port C{wait_for} (default L{port}) accepts connections."""
        proc = self.spawn()
        port = wait_for if wait_for is not None else self.port
        if port is None:
            return

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the edge exited ({proc.returncode}):\n{self.log()}")
            return connects(port)

        await until(listening, START_DEADLINE, 0.1)

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    async def wait_for_log(self, text: str, timeout: float = 15.0, count: int = 1) -> str:
        def found() -> bool:
            return self.log().count(text) >= count

        try:
            await until(found, timeout)
        except AssertionError:
            raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log()[-4000:]}") from None
        return self.log()

    def signal(self, number: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(number)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        proc = self.proc
        await until(lambda: proc.poll() is not None, timeout)
        return int(proc.returncode)

    def stop(self) -> "Deferred[None]":
        """
        SIGTERM, then SIGKILL if it has not ended within 20 s (a cleanup: a Deferred, which every
        trial waits for; an older trial would not run a coroutine given to addCleanup).
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await self.wait_exit(20)
        except AssertionError:
            self.proc.kill()
            self.proc.wait(10)


def need_tool(name: str, install: str) -> str:
    """The path of tool C{name}: a test without it is skipped, except on CI (C{$CI} set), where it fails."""
    import shutil

    from twisted.trial.unittest import SkipTest

    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        if os.environ.get("CI"):
            raise AssertionError(f"{name} is missing on CI: dev/setup installs it ({install})")
        raise SkipTest(f"{name} is not installed ({install})")
    return path


def serve_origin(test: Any, origin: Any) -> str:
    """
    Serve C{origin} (a L{MemoryOrigin}) on 127.0.0.1 for an edge in a child process; its URL.  At
    the test's end (after the edge's own cleanup, when it was added later) the origin waits until
    the connections that edge made to it are closed, then stops listening: a dead child's sockets
    are closed by the kernel, and the reactor needs a turn or two to see it.
    """
    from twisted.protocols.policies import WrappingFactory
    from twisted.web.server import Site

    site = Site(origin)
    site.log = lambda request: None  # type: ignore[method-assign]
    factory = WrappingFactory(site)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")

    async def close() -> None:
        try:
            await until(lambda: not factory.protocols, 5)
        except AssertionError:
            for protocol in list(factory.protocols):
                protocol.transport.abortConnection()
        await port.stopListening()

    test.addCleanup(lambda: Deferred.fromCoroutine(close()))
    return f"http://127.0.0.1:{port.getHost().port}/"
