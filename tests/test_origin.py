"""
What leaves the edge for an origin, byte for byte: the request target it built (treq sends the edge's
already-encoded URL as it is, h264edge.origin._ReadyURL), no cookie of its own, identity only, every
method.  Against the scripted origin on 127.0.0.1, on both treq versions dev/test runs.
"""

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from h264edge.origin import OriginClient, OriginPath
from h264edge.testing import Answer, ScriptedOrigin, listen_scripted


class RequestTargetTests(TestCase):
    def setUp(self) -> None:
        self.origin = ScriptedOrigin()
        port, self.url = listen_scripted(self.origin)
        self.addCleanup(port.stopListening)
        self.client = OriginClient([self.url], timeout=5)
        self.addCleanup(self.close_pool)

    @defer.inlineCallbacks
    def close_pool(self) -> Any:
        yield deferLater(reactor, 0.05, lambda: None)  # a discarded body gives its connection back first
        yield self.client.pool.closeCachedConnections()

    def answer(self, path: str) -> None:
        self.origin.route(path, lambda request: Answer(200, [("Set-Cookie", "a=1; Path=/")], b"body"))

    @defer.inlineCallbacks
    def test_the_target_reaches_the_origin_as_the_edge_encoded_it(self) -> Any:
        """Percent-encodings (upper and lower case, invalid UTF-8), sub-delims and an empty query
        value are sent as built: nothing is decoded, re-encoded or normalised on the way."""
        target = "/v/a%20b/%ff%FE;x=1/%E2%82%AC.mp4?q=%e2%82%ac&empty=&k=a+b&&z"
        self.answer(target.partition("?")[0])
        reply = yield defer.Deferred.fromCoroutine(self.client.fetch(target))
        reply.discard()
        self.assertEqual([r.target for r in self.origin.log], [target])

    @defer.inlineCallbacks
    def test_no_cookie_of_the_edge_own_and_a_viewer_cookie_only_for_its_request(self) -> Any:
        """The origin's Set-Cookie is never replayed by the edge; a viewer's Cookie goes with its own request."""
        self.answer("/c")
        first = yield defer.Deferred.fromCoroutine(self.client.fetch("/c"))
        first.discard()
        second = yield defer.Deferred.fromCoroutine(self.client.fetch(OriginPath("/c", (("Cookie", "v=2"),))))
        second.discard()
        third = yield defer.Deferred.fromCoroutine(self.client.fetch("/c"))
        third.discard()
        self.assertEqual([r.values("cookie") for r in self.origin.log], [[], ["v=2"], []])
        self.assertEqual({r.header("accept-encoding") for r in self.origin.log}, {"identity"})

    @defer.inlineCallbacks
    def test_pass_through_and_health_check_requests_carry_the_same_target(self) -> Any:
        self.answer("/p%2Fq")
        self.answer("/ok")
        self.client.check_path = "ok"
        response = yield defer.Deferred.fromCoroutine(
            self.client.forward("POST", "/p%2Fq?a=%00", (("Content-Type", "text/plain"),), b"x"))
        yield response.content()
        healthy = yield defer.Deferred.fromCoroutine(self.client.check(self.url))
        self.assertTrue(healthy)
        self.assertEqual([(r.method, r.target) for r in self.origin.log], [("POST", "/p%2Fq?a=%00"), ("HEAD", "/ok")])


class BaseURLTests(TestCase):
    @defer.inlineCallbacks
    def test_a_base_url_that_is_not_a_uri_yet_is_encoded(self) -> Any:
        """--origin may name a base path with a space or non-ASCII letters: they leave percent-encoded."""
        origin = ScriptedOrigin()
        port, url = listen_scripted(origin)
        self.addCleanup(port.stopListening)
        origin.route("/my%20videos/%C3%A9t%C3%A9/a.bin", lambda request: Answer(200, [], b"a"))
        client = OriginClient([url + "my videos/été/"], timeout=5)
        reply = yield defer.Deferred.fromCoroutine(client.fetch("/a.bin"))
        self.assertEqual(reply.code, 200)
        reply.discard()
        yield deferLater(reactor, 0.05, lambda: None)
        yield client.pool.closeCachedConnections()
        self.assertEqual([r.target for r in origin.log], ["/my%20videos/%C3%A9t%C3%A9/a.bin"])

    @defer.inlineCallbacks
    def test_an_ipv6_literal_origin(self) -> Any:
        """http://[::1]:PORT/ as --origin: treq's own URL handling sent '::1' to IDNA and failed every request."""
        origin = ScriptedOrigin()
        try:
            port = reactor.listenTCP(0, origin, interface="::1")
        except Exception as e:  # no IPv6 loopback here
            raise SkipTest(f"no ::1: {e}")
        self.addCleanup(port.stopListening)
        origin.route("/a.bin", lambda request: Answer(200, [], b"abc"))
        client = OriginClient([f"http://[::1]:{port.getHost().port}/"], timeout=5)
        reply = yield defer.Deferred.fromCoroutine(client.fetch("/a.bin"))
        self.assertEqual((reply.code, reply.total), (200, 3))
        reply.discard()
        yield deferLater(reactor, 0.05, lambda: None)
        yield client.pool.closeCachedConnections()
        self.assertEqual([(r.target, r.header("host")) for r in origin.log],
                         [("/a.bin", f"[::1]:{port.getHost().port}")])
