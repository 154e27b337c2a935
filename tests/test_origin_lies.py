"""
Origins that lie (issue 10 items 1 and 2): inconsistent 206 answers, and bytes after an answer's end
on a kept-alive connection.  Whatever the origin sends, a viewer gets the object's true bytes or an
error (never other bytes), as a MISS and afterwards as a HIT, once the origin behaves again.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

from h264edge.testing import Answer, ScriptedOrigin, ScriptedRequest, listen_scripted, represent
from tests.edgekit import SLICE, ScriptedEdgeTestCase, header, random_bytes

DATA = random_bytes(5 * SLICE + 777, seed=21)
ETAG = '"v1"'


def honest(request: ScriptedRequest) -> Answer:
    return represent(request, DATA, [("Content-Type", "video/mp4")], ETAG)


def assert_same_bytes(test: Any, got: bytes, expected: bytes, what: str = "") -> None:
    """Compare bodies without unittest's diff (quadratic on megabytes): lengths and the first difference."""
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        test.fail(f"{what}: {len(got)} bytes, expected {len(expected)}; they differ from byte {at}")


def asked(request: ScriptedRequest) -> tuple[int, int]:
    """The range the edge asked for, as first and last byte of DATA."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", request.header("range") or "")
    assert match is not None, request
    first_s, last_s = match.groups()
    if not first_s:
        return max(0, len(DATA) - int(last_s)), len(DATA) - 1
    return int(first_s), min(int(last_s), len(DATA) - 1) if last_s else len(DATA) - 1


class InconsistentPartialContentTests(ScriptedEdgeTestCase):
    """Issue 10.1: a 206 is used only if its Content-Range is the asked range and agrees with itself."""

    async def assert_lie_never_served(self, lie: Callable[[ScriptedRequest, Answer], Answer],
                                      request_headers: Optional[dict[str, str]] = None,
                                      refused_at_once: bool = True) -> None:
        """
        While the origin lies, viewers get 502 (C{refused_at_once}: the lie is in the first answer)
        or the object's true bytes, maybe cut short; once it stops, they get the object, MISS then HIT.
        """
        lying = [True]

        def handler(request: ScriptedRequest) -> Answer:
            answer = honest(request)
            return lie(request, answer) if lying[0] and answer.status == 206 else answer

        self.scripted.route("/v.mp4", handler)
        first, last = 0, len(DATA) - 1
        if request_headers and "Range" in request_headers:
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", request_headers["Range"])
            assert match
            first, last = int(match.group(1)), int(match.group(2))
        codes = []
        for _ in range(2):
            response, body = await self.fetch_ok("/v.mp4", request_headers)
            codes.append(response.code)
            if response.code in (200, 206) and body != b"<cut>":
                assert_same_bytes(self, body, DATA[first : last + 1], "the viewer got other bytes than the object's")
        if refused_at_once:
            self.assertEqual(codes, [502, 502])
        lying[0] = False
        for expected in ("MISS", "HIT"):
            response, body = await self.get("/v.mp4")
            self.assertEqual(response.code, 200)
            assert_same_bytes(self, body, DATA, expected)
            self.assertIn(header(response, "X-Cache"), (expected, "PARTIAL"))
        response, body = await self.get("/v.mp4")
        self.assertEqual((response.code, header(response, "X-Cache")), (200, "HIT"))
        assert_same_bytes(self, body, DATA, "HIT")

    async def test_last_before_first_is_refused(self) -> None:
        """RFC 9110 §14.4: a Content-Range whose last byte is before its first is invalid."""

        def lie(request: ScriptedRequest, answer: Answer) -> Answer:
            first, _ = asked(request)
            return answer.with_headers(("Content-Range", f"bytes {first + 5}-{first + 2}/{len(DATA)}"),
                                       drop=("Content-Range",))

        await self.assert_lie_never_served(lie)
        self.assertTrue(self.scripted.log[0].header("range"))

    async def test_range_other_than_asked_with_its_length_is_refused(self) -> None:
        """A body labelled as starting 5 bytes later than asked, with Content-Length the asked length."""

        def lie(request: ScriptedRequest, answer: Answer) -> Answer:
            first, last = asked(request)
            return answer.with_headers(("Content-Range", f"bytes {first + 5}-{last}/{len(DATA)}"),
                                       drop=("Content-Range",))

        await self.assert_lie_never_served(lie)

    async def test_range_other_than_asked_is_refused(self) -> None:
        """The body holds what its Content-Range says, but not the range asked for: refused, not shifted."""

        def lie(request: ScriptedRequest, answer: Answer) -> Answer:
            first, last = asked(request)
            return Answer(206, [("Content-Range", f"bytes {first + 5}-{last}/{len(DATA)}"), ("ETag", ETAG)],
                          DATA[first + 5 : last + 1])

        await self.assert_lie_never_served(lie)

    async def test_content_range_longer_than_content_length_is_refused(self) -> None:
        """RFC 9110 §14.4: the Content-Range's length must be the body's (here 3 slices claimed, 1 sent)."""

        def lie(request: ScriptedRequest, answer: Answer) -> Answer:
            first, _ = asked(request)
            return Answer(206, [("Content-Range", f"bytes {first}-{first + 3 * SLICE - 1}/{len(DATA)}"),
                                ("ETag", ETAG)], DATA[first : first + SLICE])

        await self.assert_lie_never_served(lie)

    async def test_total_not_above_last_is_refused(self) -> None:
        """RFC 9110 §14.4: complete-length must exceed last-pos (`bytes 0-N/N` lost a byte)."""

        def lie(request: ScriptedRequest, answer: Answer) -> Answer:
            first, last = asked(request)
            return answer.with_headers(("Content-Range", f"bytes {first}-{last}/{len(DATA) - 1}"),
                                       drop=("Content-Range",))

        await self.assert_lie_never_served(lie)

    async def test_lies_during_a_fill_of_a_known_object(self) -> None:
        """The object is known (slice 2 cached); the fill's ranged requests get a shifted Content-Range."""
        self.scripted.route("/v.mp4", honest)
        response, body = await self.get("/v.mp4", {"Range": f"bytes={2 * SLICE}-{2 * SLICE + 9}"})
        self.assertEqual((response.code, body), (206, DATA[2 * SLICE : 2 * SLICE + 10]))

        def lie(request: ScriptedRequest, answer: Answer) -> Answer:
            first, last = asked(request)
            return answer.with_headers(("Content-Range", f"bytes {first + 5}-{last}/{len(DATA)}"),
                                       drop=("Content-Range",))

        await self.assert_lie_never_served(lie, refused_at_once=False)

    async def test_a_superset_of_the_asked_range_is_cut_right(self) -> None:
        """A 206 starting before and ending after the asked range holds it: used, cut at the right bytes."""

        def wide(request: ScriptedRequest) -> Answer:
            answer = honest(request)
            if answer.status != 206:
                return answer
            first, last = asked(request)
            first, last = max(0, first - 1000), min(len(DATA) - 1, last + 1000)
            return Answer(206, [("Content-Range", f"bytes {first}-{last}/{len(DATA)}"), ("ETag", ETAG)],
                          DATA[first : last + 1])

        self.scripted.route("/v.mp4", wide)
        response, body = await self.get("/v.mp4", {"Range": f"bytes={2 * SLICE + 5}-{2 * SLICE + 9}"})
        self.assertEqual((response.code, body), (206, DATA[2 * SLICE + 5 : 2 * SLICE + 10]))
        response, body = await self.get("/v.mp4")
        self.assertEqual(response.code, 200)
        assert_same_bytes(self, body, DATA, "MISS")
        response, body = await self.get("/v.mp4")
        self.assertEqual(header(response, "X-Cache"), "HIT")
        assert_same_bytes(self, body, DATA, "HIT")


class AnswerAfterTheEndTests(ScriptedEdgeTestCase):
    """Issue 10.2: bytes after an answer's end never become the answer to another request."""

    JUNK = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: \"junk\"\r\n\r\n" + b"j" * 100

    async def check(self, then_delay: float, pause: float) -> None:
        other = random_bytes(3 * SLICE + 5, seed=22)
        extra = [True]

        def first(request: ScriptedRequest) -> Answer:
            answer = honest(request)
            if extra[0]:
                extra[0] = False
                answer.then, answer.then_delay = self.JUNK, then_delay
            return answer

        self.scripted.route("/v.mp4", first)
        self.scripted.serve("/w.mp4", other)
        response, body = await self.get("/v.mp4")
        self.assertEqual(response.code, 200)
        assert_same_bytes(self, body, DATA, "first object")
        await self.settle(pause)
        for expected in ("MISS", "HIT"):
            response, body = await self.get("/w.mp4")
            self.assertEqual((response.code, header(response, "X-Cache")), (200, expected))
            assert_same_bytes(self, body, other, expected)
        self.assertEqual([r.path for r in self.scripted.log], ["/v.mp4", "/w.mp4"])
        self.assertEqual(self.scripted.log[1].connection, 2, "the connection that got bytes after its answer was reused")

    async def test_extra_answer_in_the_same_write(self) -> None:
        await self.check(then_delay=0.0, pause=0.0)

    async def test_extra_answer_while_the_connection_is_idle(self) -> None:
        await self.check(then_delay=0.02, pause=0.2)


class PassThroughOnceTests(ScriptedEdgeTestCase):
    """Issue 10.10: a pass-through method (POST) is sent at most once, whatever the first origin does."""

    def setUp(self) -> None:
        super().setUp()
        self.second = ScriptedOrigin()
        port, self.second_url = listen_scripted(self.second)
        self.addCleanup(port.stopListening)
        for origin in (self.scripted, self.second):
            origin.route("/api", lambda request: Answer(201, [("Content-Type", "text/plain")], b"made\n"))

    async def fetch_post(self) -> tuple[Any, bytes]:
        response = await self.client.request("POST", self.edge_url + "/api", data=b"order=1")
        return response, await response.content()

    async def test_a_5xx_is_the_answer_not_a_reason_to_resend(self) -> None:
        """RFC 9110 §9.2.2: POST is not idempotent; the first origin's 503 is relayed, the second never asked."""
        self.scripted.route("/api", lambda request: Answer(503, [("Content-Type", "text/plain")], b"busy\n"))
        await self.restart_edge(origins=[self.scripted_url, self.second_url], pass_methods=["POST"])
        response, body = await self.fetch_post()
        self.assertEqual((response.code, body), (503, b"busy\n"))
        self.assertEqual([(r.method, r.body) for r in self.scripted.log], [("POST", b"order=1")])
        self.assertEqual(self.second.requests, 0)

    async def test_a_lost_answer_is_502_and_never_resent(self) -> None:
        """RFC 9110 §9.2.2: the request may have taken effect; a lost answer is 502, nothing is sent again."""
        self.scripted.route("/api", lambda request: Answer(201, raw=b"HTTP/1.1 201 Cre", close=True))
        await self.restart_edge(origins=[self.scripted_url, self.second_url], pass_methods=["POST"])
        response, body = await self.fetch_post()
        self.assertEqual(response.code, 502)
        self.assertIn(b"not sent again", body)
        self.assertEqual(self.scripted.requests, 1)
        self.assertEqual(self.second.requests, 0)

    async def test_an_unreachable_origin_passes_the_request_on(self) -> None:
        """A connection that could not be made sent nothing: the next origin gets the request."""
        port, dead_url = listen_scripted(ScriptedOrigin())
        await port.stopListening()
        await self.restart_edge(origins=[dead_url, self.second_url], pass_methods=["POST"])
        response, body = await self.fetch_post()
        self.assertEqual((response.code, body), (201, b"made\n"))
        self.assertEqual([(r.method, r.body) for r in self.second.log], [("POST", b"order=1")])
