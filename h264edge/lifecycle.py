# -*- test-case-name: tests.test_lifecycle -*-
"""
The server's life as an operator sees it: refusing to start with one clear line, raising the
open-files limit, draining viewers on SIGTERM, and SIGUSR1 / SIGHUP.

L{EdgeService} is the top service of C{twistd h264edge}.  Its listening children are started with
their option named in any error (C{--listen=tcp:8080: Address already in use}, not a traceback).
Stopping it (SIGTERM: twistd stops the reactor, which stops the services first) stops accepting at
once, closes idle keep-alive connections, lets answers in flight finish for C{drain_timeout}
seconds, and only then stops the other children (store, sync threads); the reactor closes what
is still open after that.
"""

from __future__ import annotations

import resource
import signal
from typing import Any, Callable, Iterable, Optional

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError, ProcessExitedAlready
from twisted.logger import Logger

from h264edge.web.answers import Draining

log = Logger()


class StartupRefused(SystemExit):
    """The edge cannot start as configured.  Its message is one line that names the option."""


def open_more_files() -> int:
    """L{raise_open_files_limit}, logged; the limit now."""
    before, after = raise_open_files_limit()
    if after != before:
        log.info("open files limit raised from {before} to {after}", before=before, after=after)
    else:
        log.info("open files limit: {n}", n=after)
    return after


def raise_open_files_limit() -> tuple[int, int]:
    """
    Raise this process's soft limit of open files to its hard limit (a viewer is a descriptor,
    and so is every cached object being served); C{(before, after)}.  An unlimited hard limit
    is capped at the kernel's C{fs.nr_open}.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read().strip())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


class EdgeService(service.MultiService):
    """
    The top service.  L{add_listener} children are where viewers (or operators) connect: they start
    with their option named in errors, and stop first when the service stops, while the
    L{Draining} connections get C{drain_timeout} seconds to finish.
    """

    poll_interval = 0.1

    def __init__(self, drain_timeout: float = 30.0, clock: Any = None) -> None:
        super().__init__()
        self.drain_timeout = drain_timeout
        self.clock = clock
        self.listeners: dict[Any, str] = {}  # service -> "--option=value"
        self.drains: list[Draining] = []
        self.drained: Optional[defer.Deferred[None]] = None

    def add_listener(self, child: Any, option: str) -> None:
        child.setServiceParent(self)
        self.listeners[child] = option

    def _clock(self) -> Any:
        if self.clock is None:
            from twisted.internet import reactor

            return reactor
        return self.clock

    def privilegedStartService(self) -> None:
        for child in list(self):
            self._refusing(child, child.privilegedStartService)
        service.Service.privilegedStartService(self)

    def startService(self) -> None:
        service.Service.startService(self)
        for child in list(self):
            self._refusing(child, child.startService)

    def _refusing(self, child: Any, start: Callable[[], Any]) -> None:
        try:
            start()
        except (CannotListenError, OSError) as e:
            option = self.listeners.get(child)
            if option is None:
                raise
            reason = e.socketError if isinstance(e, CannotListenError) else e
            text = getattr(reason, "strerror", None) or str(reason)
            raise StartupRefused(f"h264edge: {option}: cannot listen: {text}") from None

    def stopService(self) -> "defer.Deferred[Any]":
        service.Service.stopService(self)
        d = self.drained = defer.Deferred.fromCoroutine(self._drain())
        d.addErrback(lambda f: log.failure("draining failed", f))
        d.addCallback(lambda _: self._stop_rest())
        return d

    async def _drain(self) -> None:
        stopping = [_stop(child) for child in self.listeners if child.running]
        busy = idle = 0
        for drain in self.drains:
            counts = drain.begin()
            busy, idle = busy + counts[0], idle + counts[1]
        if busy or idle:
            log.info("draining: {busy} answers in flight (up to {t} s), {idle} idle connections closed",
                     busy=busy, idle=idle, t=self.drain_timeout)
        clock = self._clock()
        deadline = clock.seconds() + self.drain_timeout
        left = sum(drain.open() for drain in self.drains)
        while left and clock.seconds() < deadline:
            await task.deferLater(clock, self.poll_interval, lambda: None)
            left = sum(drain.open() for drain in self.drains)
        if left:
            log.warn("drain timeout: closing {n} connections still open", n=left)
            for drain in self.drains:
                for channel in drain.connected():
                    channel.transport.abortConnection()
            await task.deferLater(clock, 0, lambda: None)  # their answers are logged as cut on this turn
        elif busy:
            log.info("drained")
        for drain in self.drains:
            drain.finish()
        await defer.gatherResults(stopping, consumeErrors=True).addErrback(
            lambda f: log.failure("stopping a listener failed", f))

    def _stop_rest(self) -> "defer.Deferred[Any]":
        rest = [child for child in reversed(list(self)) if child.running and child not in self.listeners]
        return defer.DeferredList([_stop(child) for child in rest])


def _stop(child: Any) -> "defer.Deferred[Any]":
    stop: Callable[[], Any] = child.stopService
    return defer.maybeDeferred(stop)


class SignalHandlers(service.Service):
    """
    SIGUSR1 and SIGHUP handlers for as long as the service runs (each calls its function on the
    reactor thread; a handler that was there before, such as twistd's own log rotation, is called
    too).  Without them both signals end the process.
    """

    def __init__(self, handlers: dict[int, Callable[[], Any]], reactor: Any = None) -> None:
        self.handlers = handlers
        self.reactor = reactor
        self._previous: dict[int, Any] = {}

    def startService(self) -> None:
        super().startService()
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        for number, function in self.handlers.items():
            previous = signal.getsignal(number)
            self._previous[number] = previous

            def handler(signum: int, frame: Any, function: Callable[[], Any] = function, previous: Any = previous) -> None:
                reactor.callFromThread(_call_logged, function)
                if callable(previous):
                    previous(signum, frame)

            signal.signal(number, handler)

    def stopService(self) -> Any:
        for number, previous in self._previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        return super().stopService()


def _call_logged(function: Callable[[], Any]) -> None:
    d: defer.Deferred[Any] = defer.maybeDeferred(function)
    d.addErrback(lambda f: log.failure("signal handler failed", f))


def forward_signal(targets: Iterable[Any], number: int) -> None:
    """Send signal C{number} to the processes of C{targets} (Twisted process transports)."""
    for transport in targets:
        try:
            transport.signalProcess(number)  # a number: Twisted maps only a few names (HUP, TERM...)
        except (ProcessExitedAlready, OSError):
            pass  # a worker that just ended
