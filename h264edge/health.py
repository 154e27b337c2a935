# -*- test-case-name: tests.test_health -*-
"""
What the edge knows about each origin's health, and the limits it keeps towards them.

L{OriginHealth} holds, per origin base URL:
  - a circuit breaker fed by real requests: a connect failure, a timeout or a dropped answer opens
    it at once, 5xx answers after C{fall} in a row; an open origin is skipped (the next one is asked
    at once, without paying C{--origin-timeout} again) for C{retry_after} seconds, doubling up to
    C{max_retry_after} while it keeps failing; then one request is let through as a trial, and its
    success closes the circuit;
  - optional background health checks (L{HealthChecks}): C{fall} failed checks in a row mark an
    origin down, C{rise} good ones mark it up again (and close its circuit);
  - a limit on the requests in flight to it (C{limit}, 0 for none): more wait for a free slot;
  - counters (requests, failures, skips) for logs and metrics.

L{RetryBudget} bounds the extra origin attempts (failover and resumption) to a share of the
requests made, so an outage of every origin does not multiply the load on them.

Everything here is pure bookkeeping over an injected clock: the origin client asks and reports.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Awaitable, Callable, Iterable, Optional

from attrs import define, field
from twisted.application import service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


@define(eq=False)
class OriginState:
    """One origin's health and load, as L{OriginHealth} keeps it."""

    base: str
    failures: int = 0  # failed requests in a row
    open_until: float = 0.0  # circuit open (origin skipped) until then; 0 = closed
    backoff: float = 0.0  # the last opening's length
    trial: bool = False  # the circuit is half-open and its one trial request is in flight
    checked_down: bool = False  # marked down by the health checks
    check_failures: int = 0
    check_successes: int = 0
    active: int = 0  # requests holding a slot (answer or body still in flight)
    waiting: deque[Deferred[None]] = field(factory=deque)
    requests: int = 0
    failed_requests: int = 0
    skipped: int = 0

    @property
    def circuit_open(self) -> bool:
        return self.open_until > 0.0

    def describe(self, now: float) -> str:
        if self.checked_down:
            return "down (health checks)"
        if self.circuit_open:
            if now < self.open_until:
                return f"down for {self.open_until - now:.1f}s more (circuit open)"
            return "on trial (circuit half-open)"
        return "up"


class OriginHealth:
    """
    Circuit breakers, health-check state and connection slots for the origins C{bases}.

    @param fall: failed health checks (or 5xx answers) in a row that mark an origin down.
    @param rise: good health checks in a row that mark a down origin up.
    @param retry_after: seconds an origin is skipped after its first failure; doubles while it fails.
    @param limit: requests in flight per origin (0: no limit).
    """

    def __init__(
        self,
        bases: Iterable[str],
        clock: Any,
        *,
        fall: int = 3,
        rise: int = 2,
        retry_after: float = 1.0,
        max_retry_after: float = 60.0,
        limit: int = 0,
    ) -> None:
        if fall < 1 or rise < 1:
            raise ValueError("fall and rise must be at least 1")
        self.clock = clock
        self.fall = fall
        self.rise = rise
        self.retry_after = retry_after
        self.max_retry_after = max(max_retry_after, retry_after)
        self.limit = limit
        self.states = {base: OriginState(base) for base in bases}

    def state(self, base: str) -> OriginState:
        return self.states[base]

    # -- the circuit breaker --------------------------------------------------------------------

    def admit(self, base: str) -> bool:
        """
        Whether a request may go to C{base} now.  A half-open origin admits one trial at a time; the
        caller must then report its outcome with L{succeeded} or L{failed} (or L{abandoned}).
        """
        state = self.states[base]
        if state.checked_down:
            state.skipped += 1
            return False
        if state.circuit_open:
            if self.clock.seconds() < state.open_until or state.trial:
                state.skipped += 1
                return False
            state.trial = True
        state.requests += 1
        return True

    def succeeded(self, base: str) -> None:
        """C{base} answered (any status below 500)."""
        state = self.states[base]
        if state.circuit_open:
            log.info("origin {base} answers again; circuit closed", base=base)
        state.failures = 0
        state.open_until = 0.0
        state.backoff = 0.0
        state.trial = False

    def failed(self, base: str, hard: bool) -> None:
        """
        A request to C{base} failed: C{hard} for no answer at all (connect failure, timeout, dropped
        connection, a body gone silent), which opens the circuit at once; else a 5xx, which opens it
        after C{fall} in a row.
        """
        state = self.states[base]
        state.failures += 1
        state.failed_requests += 1
        trial, state.trial = state.trial, False
        if not (hard or trial or state.failures >= self.fall or state.circuit_open):
            return
        state.backoff = min(state.backoff * 2, self.max_retry_after) if state.backoff else self.retry_after
        state.open_until = self.clock.seconds() + state.backoff
        log.warn("origin {base} failed {n} time(s) in a row; skipping it for {s}s", base=base,
                 n=state.failures, s=state.backoff)

    def abandoned(self, base: str) -> None:
        """A request admitted to C{base} ended without telling anything about it (cancelled, refused by us)."""
        self.states[base].trial = False

    def all_skipped_message(self) -> str:
        now = self.clock.seconds()
        return "every origin is marked down: " + "; ".join(
            f"{base} {state.describe(now)}" for base, state in self.states.items())

    # -- health checks --------------------------------------------------------------------------

    def check_result(self, base: str, ok: bool) -> None:
        """The outcome of one background health check of C{base}."""
        state = self.states[base]
        if ok:
            state.check_failures = 0
            state.check_successes += 1
            if (state.checked_down or state.circuit_open) and state.check_successes >= self.rise:
                if state.checked_down:
                    log.info("origin {base} is up ({n} good checks)", base=base, n=state.check_successes)
                state.checked_down = False
                self.succeeded(base)
        else:
            state.check_successes = 0
            state.check_failures += 1
            if not state.checked_down and state.check_failures >= self.fall:
                log.warn("origin {base} is down ({n} failed checks)", base=base, n=state.check_failures)
                state.checked_down = True

    # -- connection slots -----------------------------------------------------------------------

    def slot(self, base: str) -> "Deferred[None]":
        """Fires when a request to C{base} may be sent; pair it with L{release}.  Cancellable."""
        state = self.states[base]
        if not self.limit or (state.active < self.limit and not state.waiting):
            state.active += 1
            return succeed(None)

        def cancel(d: "Deferred[None]") -> None:
            try:
                state.waiting.remove(d)
            except ValueError:
                pass

        d: Deferred[None] = Deferred(cancel)
        state.waiting.append(d)
        return d

    def release(self, base: str) -> None:
        state = self.states[base]
        if state.waiting:
            state.waiting.popleft().callback(None)  # the slot passes on
        else:
            state.active = max(0, state.active - 1)


class RetryBudget:
    """
    Extra attempts allowed (failover to the next origin, a resumption): at most C{ratio} of the first
    attempts made in the last C{window} seconds, plus C{floor} per second, so a handful of failures
    always gets its retries but an outage never multiplies the requests sent to the origins.
    """

    def __init__(self, clock: Any, ratio: float = 0.2, floor: float = 5.0, window: float = 10.0) -> None:
        self.clock = clock
        self.ratio = ratio
        self.floor = floor
        self.window = window
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.refused = 0

    def _trim(self, now: float) -> None:
        horizon = now - self.window
        for times in (self._requests, self._retries):
            while times and times[0] <= horizon:
                times.popleft()

    def deposit(self) -> None:
        """A first attempt was made."""
        now = self.clock.seconds()
        self._trim(now)
        self._requests.append(now)

    def withdraw(self) -> bool:
        """Whether one more attempt may be made now (and count it if so)."""
        now = self.clock.seconds()
        self._trim(now)
        if len(self._retries) + 1 > self.floor * self.window + self.ratio * len(self._requests):
            self.refused += 1
            return False
        self._retries.append(now)
        return True


class HealthChecks(service.Service):
    """
    Every C{interval} seconds, C{check(base)} for each origin (a HEAD of the check path, through the
    origin client, so an S3 origin's checks are signed too) and reports the outcome to C{health}.
    C{check} returns whether the origin is healthy; an exception counts as unhealthy.
    """

    def __init__(
        self, health: OriginHealth, check: Callable[[str], Awaitable[bool]], interval: float, clock: Any = None
    ) -> None:
        self.health = health
        self.check = check
        self.interval = interval
        self.clock = clock
        self._loop: Optional[LoopingCall] = None
        self._running: dict[str, Deferred[Any]] = {}

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.round)
        if self.clock is not None:
            self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def round(self) -> None:
        for base in self.health.states:
            if base in self._running:
                continue  # the last check is still waiting for its timeout
            d = Deferred.fromCoroutine(self._one(base))
            if not d.called:
                self._running[base] = d

    async def _one(self, base: str) -> None:
        try:
            ok = await self.check(base)
        except Exception as e:
            log.debug("health check of {base} failed: {e}", base=base, e=e)
            ok = False
        finally:
            self._running.pop(base, None)
        if self.running:
            self.health.check_result(base, ok)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for d in list(self._running.values()):
            d.cancel()
        self._running.clear()
        return None
