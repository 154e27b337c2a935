# -*- test-case-name: tests.test_workers -*-
"""
Several processes serving one TCP port (C{--workers=N}).

The first process (the one twistd started) binds the listening socket once, serves on it, and runs
N-1 worker processes (C{python -m twisted h264edge <same options> --listen-fd=3}) that inherit the
socket as their descriptor 3 and adopt it with C{reactor.adoptStreamPort}; the kernel hands each
new connection to whichever process accepts it first.  All of them share one cache directory (see
L{h264edge.store._store} for why that is safe).

Workers that die are restarted after a backoff (0.5 s doubling to 30 s; a worker that lived 60 s
resets it; a slot whose worker died 8 times in a row without living that long is given up and
logged).  When the parent's service stops, workers get SIGTERM, then SIGKILL after
L{STOP_TIMEOUT} seconds.  Should the parent itself be killed outright, Linux delivers SIGTERM to
its workers (C{PR_SET_PDEATHSIG}, set by L{die_with_parent}).  Worker output (their log) is relayed
line by line into the parent's log, prefixed with the worker's number and pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from typing import Any, Optional, Sequence

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from h264edge.web.answers import EdgeRequest

log = Logger()

LISTEN_FD = 3  # the descriptor number a worker finds the listening socket under
PARENT_PID_ENV = "H264EDGE_PARENT_PID"
STOP_TIMEOUT = 5.0
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
HEALTHY_AFTER = 60.0
MAX_QUICK_DEATHS = 8
MAX_LINE = 16384


def bind_tcp(interface: str, port: int, backlog: int = 50) -> socket.socket:
    """A listening, non-blocking TCP socket on C{interface}:C{port} (IPv6 if the interface says so)."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def adopt(reactor: Any, fd: int, factory: Any) -> Any:
    """Serve C{factory} on the listening socket C{fd} (the reactor works on its own duplicate)."""
    with socket.socket(fileno=os.dup(fd)) as probe:
        family = probe.family
    return reactor.adoptStreamPort(fd, family, factory)


def die_with_parent() -> None:
    """
    In a worker: have the kernel send us SIGTERM when the parent dies (Linux), and exit now if it
    already has.  Elsewhere the parent's SIGTERM at shutdown is all there is.
    """
    parent = os.environ.get(PARENT_PID_ENV)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if parent is not None and os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


class ServedByRequest(EdgeRequest):
    """A request whose answer names the process that served it (C{X-Served-By: <pid>})."""

    def process(self) -> None:
        self.setHeader(b"X-Served-By", str(os.getpid()).encode("ascii"))
        super().process()


def site_naming_process(site: Site) -> Site:
    site.requestFactory = ServedByRequest  # type: ignore[assignment]
    return site


class InheritedPort(service.Service):
    """Serves a site on a listening socket inherited as descriptor C{fd} (a worker's side)."""

    def __init__(self, fd: int, factory: Any, reactor: Any = None) -> None:
        self.fd = fd
        self.factory = factory
        self.reactor = reactor
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        die_with_parent()
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.port = adopt(reactor, self.fd, self.factory)
        os.close(self.fd)  # the reactor holds its own duplicate

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.started_at = pool.reactor.seconds()
        self._partial = {1: b"", 2: b""}

    @property
    def pid(self) -> Optional[int]:
        return self.transport.pid if self.transport is not None else None  # type: ignore[attr-defined]

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE:
            lines.append(rest)
            rest = b""
        self._partial[fd] = rest
        for line in lines:
            self._relay(line)

    def _relay(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            log.info("worker {n} [{pid}]: {line}", n=self.number, pid=self.pid, line=text)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._relay(rest)
        self._partial.clear()
        self.pool._ended(self, reason)
        self.ended.callback(None)


def _cancel_call(result: Any, call: Any) -> Any:
    if call.active():
        call.cancel()
    return result


class WorkerPool(service.Service):
    """
    The parent's side of C{--workers}: binds C{interface}:C{port} once (privileged start), serves
    C{factory} on it, and keeps C{count} worker processes (running C{argv}) serving it too.

    @ivar argv: the worker command; the socket is handed over as descriptor L{LISTEN_FD}.
    """

    def __init__(
        self,
        interface: str,
        port: int,
        factory: Any,
        argv: Sequence[str],
        count: int,
        backlog: int = 50,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.interface = interface
        self.requested_port = port
        self.factory = factory
        self.argv = list(argv)
        self.count = count
        self.backlog = backlog
        self.reactor = reactor
        self.socket: Optional[socket.socket] = None
        self.port: Any = None
        self.workers: dict[int, _WorkerProtocol] = {}
        self._quick_deaths: dict[int, int] = {}
        self._restarts: dict[int, Any] = {}
        self.stop_timeout = STOP_TIMEOUT  # seconds from SIGTERM to SIGKILL (the edge's drain and more)

    @property
    def address(self) -> tuple[str, int]:
        assert self.socket is not None
        host, port = self.socket.getsockname()[:2]
        return host, port

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.socket is None:
            self.socket = bind_tcp(self.interface, self.requested_port, self.backlog)

    def startService(self) -> None:
        if self.socket is None:
            self.privilegedStartService()
        super().startService()
        assert self.socket is not None
        self.port = adopt(self.reactor, self.socket.fileno(), self.factory)
        log.info("serving {address} with {n} processes", address=self.address, n=self.count)
        for number in range(1, self.count):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        if not self.running or self.socket is None:
            return
        worker = _WorkerProtocol(self, number)
        env = dict(os.environ, **{PARENT_PID_ENV: str(os.getpid())})
        self.reactor.spawnProcess(
            worker, self.argv[0], self.argv, env=env, path=os.getcwd(),
            childFDs={0: "w", 1: "r", 2: "r", LISTEN_FD: self.socket.fileno()},
        )
        self.workers[number] = worker
        log.info("started worker {n} (pid {pid})", n=number, pid=worker.pid)

    def _ended(self, worker: _WorkerProtocol, reason: Failure) -> None:
        number = worker.number
        if self.workers.get(number) is worker:
            del self.workers[number]
        if not self.running:
            return
        status = reason.value.exitCode if reason.check(error.ProcessTerminated) else 0
        signal_number = getattr(reason.value, "signal", None)
        lived = self.reactor.seconds() - worker.started_at
        quick = self._quick_deaths[number] = 0 if lived >= HEALTHY_AFTER else self._quick_deaths.get(number, 0) + 1
        if quick > MAX_QUICK_DEATHS:
            log.error("worker {n} died {k} times in a row; not restarting it", n=number, k=quick)
            return
        delay = min(FIRST_BACKOFF * 2 ** max(quick - 1, 0), MAX_BACKOFF)
        log.warn("worker {n} (pid {pid}) ended (exit {status}, signal {sig}); restarting in {delay}s",
                 n=number, pid=worker.transport.pid if worker.transport else None,  # type: ignore[attr-defined]
                 status=status, sig=signal_number, delay=delay)
        self._restarts[number] = self.reactor.callLater(delay, self._spawn, number)

    def stopService(self) -> Any:
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waits: list[defer.Deferred[Any]] = []
        for worker in list(self.workers.values()):
            waits.append(worker.ended)
            self._signal(worker, "TERM")
            kill = self.reactor.callLater(self.stop_timeout, self._signal, worker, "KILL")
            worker.ended.addBoth(_cancel_call, kill)
        if self.port is not None:
            port, self.port = self.port, None
            stopping: Any = port
            waits.append(defer.maybeDeferred(stopping.stopListening))
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    @staticmethod
    def _signal(worker: _WorkerProtocol, name: str) -> None:
        transport: Any = worker.transport
        try:
            transport.signalProcess(name)
        except (error.ProcessExitedAlready, AttributeError):
            pass
