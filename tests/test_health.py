"""
Origins with health: circuit breakers, health checks, the retry budget and per-origin connection
limits (L{h264edge.health}), alone on a clock and through a real edge in front of real origins.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock, deferLater
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from h264edge.errors import OriginUnavailable
from h264edge.fill import Filler
from h264edge.health import HealthChecks, OriginHealth, RetryBudget
from h264edge.origin import OriginClient
from h264edge.tap import Options
from h264edge.testing import MemoryOrigin, listen_origin
from tests.edgekit import EdgeTestCase, header, random_bytes

A, B = "http://a/", "http://b/"


class CircuitBreakerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.health = OriginHealth([A, B], self.clock, fall=3, rise=2, retry_after=1.0, max_retry_after=8.0)

    def test_a_connect_failure_skips_the_origin_at_once_until_its_retry_time(self) -> None:
        self.assertTrue(self.health.admit(A))
        self.health.failed(A, hard=True)
        self.assertFalse(self.health.admit(A))
        self.assertTrue(self.health.admit(B))
        self.clock.advance(0.99)
        self.assertFalse(self.health.admit(A))
        self.clock.advance(0.01)
        self.assertTrue(self.health.admit(A))  # the trial
        self.assertFalse(self.health.admit(A), "one trial at a time")
        self.health.succeeded(A)
        self.assertTrue(self.health.admit(A))
        self.assertTrue(self.health.admit(A))

    def test_a_failed_trial_doubles_the_back_off_up_to_the_cap(self) -> None:
        self.health.failed(A, hard=True)
        waits = []
        for _ in range(6):
            waited = 0.0
            while not self.health.admit(A):
                self.clock.advance(0.5)
                waited += 0.5
            waits.append(waited)
            self.health.failed(A, hard=True)
        self.assertEqual(waits, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0])

    def test_server_errors_open_the_circuit_only_after_fall_in_a_row(self) -> None:
        self.health.failed(A, hard=False)
        self.health.failed(A, hard=False)
        self.assertTrue(self.health.admit(A))
        self.health.succeeded(A)
        self.health.failed(A, hard=False)
        self.health.failed(A, hard=False)
        self.assertTrue(self.health.admit(A))
        self.health.failed(A, hard=False)
        self.assertFalse(self.health.admit(A))

    def test_health_checks_mark_down_after_fall_and_up_after_rise(self) -> None:
        for _ in range(2):
            self.health.check_result(A, False)
        self.assertTrue(self.health.admit(A))
        self.health.check_result(A, False)
        self.assertFalse(self.health.admit(A))
        self.clock.advance(3600)
        self.assertFalse(self.health.admit(A), "checks decide, not the back-off")
        self.health.check_result(A, True)
        self.assertFalse(self.health.admit(A))
        self.health.check_result(A, True)
        self.assertTrue(self.health.admit(A))

    def test_good_checks_close_an_open_circuit(self) -> None:
        self.health.failed(A, hard=True)
        self.health.check_result(A, True)
        self.health.check_result(A, True)
        self.assertTrue(self.health.admit(A))
        self.assertTrue(self.health.admit(A))

    def test_slots_are_handed_on_in_order(self) -> None:
        health = OriginHealth([A], self.clock, limit=2)
        first, second, third, fourth = (health.slot(A) for _ in range(4))
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertNoResult(third)
        fourth.cancel()
        self.failureResultOf(fourth)
        health.release(A)
        self.successResultOf(third)
        health.release(A)
        health.release(A)
        self.assertEqual(health.state(A).active, 0)


class RetryBudgetTests(SynchronousTestCase):
    def test_retries_are_a_share_of_the_requests_plus_a_floor(self) -> None:
        clock = Clock()
        budget = RetryBudget(clock, ratio=0.2, floor=0.1, window=10.0)  # floor: 1 per window
        for _ in range(20):
            budget.deposit()
        self.assertEqual(sum(budget.withdraw() for _ in range(10)), 5)  # 1 + 20 * 0.2
        clock.advance(10.0)
        self.assertEqual(sum(budget.withdraw() for _ in range(10)), 1)  # only the floor once they aged out
        self.assertEqual(budget.refused, 14)


class HealthCheckServiceTests(SynchronousTestCase):
    def test_checks_run_each_interval_and_report(self) -> None:
        clock = Clock()
        health = OriginHealth([A, B], clock, fall=2, rise=1)
        answers = {A: False, B: True}
        calls: list[str] = []

        async def check(base: str) -> bool:
            calls.append(base)
            if base == "boom":
                raise OSError()
            return answers[base]

        checks = HealthChecks(health, check, 5.0, clock=clock)
        checks.startService()
        self.assertEqual(calls, [A, B])
        clock.advance(5.0)
        self.assertTrue(health.state(A).checked_down)
        self.assertFalse(health.state(B).checked_down)
        answers[A] = True
        clock.advance(5.0)
        self.assertFalse(health.state(A).checked_down)
        checks.stopService()
        clock.advance(50.0)
        self.assertEqual(len(calls), 6)


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--origin=http://o/", *argv])
        return options

    def test_defaults(self) -> None:
        options = self.parse()
        self.assertEqual(
            [options[n] for n in ("origin-idle-timeout", "origin-retry-after", "origin-retry-budget",
                                  "origin-connections", "origin-check", "origin-check-interval", "origin-rise",
                                  "origin-fall")],
            [30.0, 1.0, 0.2, 0, "", 5.0, 2, 3])

    def test_bad_values_are_usage_errors(self) -> None:
        for bad in ("--origin-idle-timeout=0", "--origin-idle-timeout=soon", "--origin-fall=0",
                    "--origin-connections=-1", "--origin-retry-budget=1e9", "--origin-rise=" + "9" * 5000):
            self.assertRaises(usage.UsageError, self.parse, bad)


class _Silent(protocol.Protocol):
    """Accepts and reads, never answers: a hung origin."""


class HungOriginTests(EdgeTestCase):
    """Two origins, the first hung: misses after the first do not wait for it."""

    retry_after = 60.0
    with_good_origin = True

    def start_edge(self, origins: Any = None, **kwargs: Any) -> None:
        self.hung_connections = 0
        factory = protocol.ServerFactory()

        def build(addr: Any) -> protocol.Protocol:
            self.hung_connections += 1
            p = _Silent()
            p.factory = factory
            return p

        factory.buildProtocol = build  # type: ignore[method-assign]
        self.hung_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.hung_port.stopListening)
        self.hung_url = f"http://127.0.0.1:{self.hung_port.getHost().port}/"
        super().start_edge([self.hung_url] + ([self.origin_url] if self.with_good_origin else []), **kwargs)
        self.origin_client.timeout = 0.3
        self.origin_client.health.retry_after = self.retry_after

    @defer.inlineCallbacks
    def test_misses_skip_a_hung_origin_after_its_first_timeout(self) -> Any:
        for i in range(5):
            self.origin.add(f"/f{i}.bin", random_bytes(1000, seed=i))
        for i in range(5):
            response, body = yield defer.Deferred.fromCoroutine(self.get(f"/f{i}.bin"))
            self.assertEqual((response.code, body), (200, random_bytes(1000, seed=i)))
        self.assertEqual(self.hung_connections, 1)
        self.assertEqual(self.origin.requests, 5)
        self.assertEqual(self.origin_client.health.state(self.hung_url).skipped, 4)


class HungOriginRetryTests(HungOriginTests):
    retry_after = 0.5

    @defer.inlineCallbacks
    def test_misses_skip_a_hung_origin_after_its_first_timeout(self) -> Any:
        self.origin.add("/a.bin", b"a" * 100)
        self.origin.add("/b.bin", b"b" * 100)
        yield defer.Deferred.fromCoroutine(self.get("/a.bin"))
        yield deferLater(reactor, 0.6, lambda: None)
        response, body = yield defer.Deferred.fromCoroutine(self.get("/b.bin"))
        self.assertEqual(body, b"b" * 100)
        self.assertEqual(self.hung_connections, 2, "tried again after its back-off")


class OnlyOriginHungTests(HungOriginTests):
    with_good_origin = False

    @defer.inlineCallbacks
    def test_misses_skip_a_hung_origin_after_its_first_timeout(self) -> Any:
        response, _ = yield defer.Deferred.fromCoroutine(self.get("/x.bin"))
        self.assertEqual(response.code, 504)
        response, body = yield defer.Deferred.fromCoroutine(self.get("/y.bin"))
        self.assertEqual(response.code, 502)
        self.assertIn(b"every origin is marked down", body)
        self.assertEqual(self.hung_connections, 1)


class SilentBodyTests(EdgeTestCase):
    """A body that goes silent mid-way is dropped after the idle timeout and resumed from the next origin."""

    def start_edge(self, origins: Any = None, **kwargs: Any) -> None:
        self.silent = MemoryOrigin()
        self.silent.dribble = (256 * 1024, 3600.0)  # the first piece, then silence
        port, self.silent_url = listen_origin(self.silent)
        self.addCleanup(port.stopListening)
        super().start_edge([self.silent_url, self.origin_url], **kwargs)
        self.edge.filler = Filler(self.store, self.origin_client, idle_timeout=0.3)

    @defer.inlineCallbacks
    def test_silent_body_resumes_from_the_next_origin(self) -> Any:
        data = random_bytes(3 * 2**20, seed=7)
        self.silent.add("/v.bin", data)
        self.origin.add("/v.bin", data, etag=self.silent.files["/v.bin"].etag)
        response, body = yield defer.Deferred.fromCoroutine(self.get("/v.bin"))
        self.assertEqual((response.code, len(body), body == data), (200, len(data), True))
        self.assertEqual(header(response, "X-Cache"), "MISS")
        self.assertEqual(len(self.silent.log), 1)
        self.assertTrue(self.origin_client.health.state(self.silent_url).circuit_open)
        self.assertEqual([e.range for e in self.origin.log], [f"bytes=262144-{len(data) - 1}"])


async def close_later(client: OriginClient) -> None:
    """Close a client's pool once the connections of dropped bodies are gone."""
    await deferLater(reactor, 0.1, lambda: None)
    await client.pool.closeCachedConnections()


class ConnectionLimitTests(EdgeTestCase):
    @defer.inlineCallbacks
    def test_a_second_request_waits_for_the_first_answers_body(self) -> Any:
        client = OriginClient([self.origin_url], timeout=5, connection_limit=1)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(close_later(client)))
        self.origin.add("/a.bin", b"a" * 1000)
        self.origin.add("/b.bin", b"b" * 1000)
        first = yield defer.Deferred.fromCoroutine(client.fetch("/a.bin"))
        second = defer.Deferred.fromCoroutine(client.fetch("/b.bin"))
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertNoResult(second)
        self.assertEqual(self.origin.requests, 1)
        first.discard()
        reply = yield second
        reply.discard()
        self.assertEqual(self.origin.requests, 2)
        self.assertEqual(client.health.state(self.origin_url).active, 0)

    @defer.inlineCallbacks
    def test_a_full_origin_sends_the_request_to_the_next_after_the_timeout(self) -> Any:
        other = MemoryOrigin()
        other.add("/b.bin", b"b" * 10)
        port, other_url = listen_origin(other)
        self.addCleanup(port.stopListening)
        client = OriginClient([self.origin_url, other_url], timeout=0.2, connection_limit=1)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(close_later(client)))
        self.origin.add("/a.bin", b"a" * 1000)
        first = yield defer.Deferred.fromCoroutine(client.fetch("/a.bin"))
        reply = yield defer.Deferred.fromCoroutine(client.fetch("/b.bin"))
        self.assertEqual(reply.url, other_url + "b.bin")
        reply.discard()
        first.discard()
        self.assertFalse(client.health.state(self.origin_url).circuit_open, "busy is not down")


class BudgetTests(EdgeTestCase):
    @defer.inlineCallbacks
    def test_failover_stops_when_the_retry_budget_is_spent(self) -> Any:
        self.origin.fail_code = 503
        clock = reactor
        client = OriginClient([self.origin_url, self.origin_url + "again/"], timeout=2,
                              retry_budget=RetryBudget(clock, ratio=0.0, floor=0.0))
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(close_later(client)))
        # the failover the budget refuses is not made: the first origin's 503 is the answer (relayed)
        reply = yield defer.Deferred.fromCoroutine(client.fetch("/a.bin"))
        reply.discard()
        self.assertEqual(reply.code, 503)
        self.assertEqual(self.origin.requests, 1)
        # a first origin that gave no answer at all: the second is not tried, no answer is had
        dead = listen_origin(MemoryOrigin())[0]
        dead_url = f"http://127.0.0.1:{dead.getHost().port}/"
        yield dead.stopListening()
        other = OriginClient([dead_url, self.origin_url], timeout=2,
                             retry_budget=RetryBudget(clock, ratio=0.0, floor=0.0))
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(close_later(other)))
        with self.assertRaises(OriginUnavailable) as caught:
            yield defer.Deferred.fromCoroutine(other.fetch("/a.bin"))
        self.assertIn("retry budget spent", str(caught.exception))
        self.assertEqual(self.origin.requests, 1)
