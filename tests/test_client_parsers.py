"""
Every parser of what a client sends (request target, query, start/end, FLV offsets, Range, If-Range,
If-None-Match, If-Modified-Since, the hot path's request head, --listen for --workers): any byte
string yields a value or an error that maps to a 4xx (usage error for options), never another
exception; plus the values the grammars must and must not take.
"""

from __future__ import annotations

from typing import Any, Callable

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from h264edge.tap import tcp_listen_address
from h264edge.web import http as rules
from h264edge.web.hot import plain_get_target
from h264edge.web.resource import _status_for

PROPERTY = settings(max_examples=400, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

# header values reach the parsers as latin-1 text of the bytes sent; query values percent-decoded the same way
header_text = st.binary(max_size=300).map(lambda raw: raw.decode("latin-1"))
numberish = st.text(alphabet="0123456789.-+eE_ \t\u00b2\u0661\uff11xXnaif,", max_size=40)
digits = st.text(alphabet="0123456789", min_size=1, max_size=6000)
rangeish = st.builds(lambda unit, spec: unit + spec, st.sampled_from(["bytes=", "BYTES =", "items=", ""]),
                     st.text(alphabet="0123456789-, \t\u00b2", max_size=60))


def client_error(call: Callable[[], Any]) -> Any:
    """Run a parser; a raised error must be one the edge answers with a 4xx."""
    try:
        return call()
    except rules.BadRequest as e:
        code = _status_for(Failure(e))[0]
    except rules.Unsatisfiable as e:
        code = _status_for(Failure(e))[0]
    assert 400 <= code < 500, code
    return None


class TargetProperties(SynchronousTestCase):
    @PROPERTY
    @given(st.binary(max_size=200), st.binary(max_size=200), st.booleans())
    def test_any_target_is_a_target_or_400(self, path: bytes, query: bytes, keep: bool) -> None:
        target = client_error(lambda: rules.parse_target(b"/" + path, query, keep))
        if target is not None:
            self.assertTrue(target.path.isascii() and target.key.isascii() and target.origin_query.isascii())
            self.assertNotIn("#", target.key)
            self.assertNotIn(" ", target.key)

    @PROPERTY
    @given(st.lists(st.binary(min_size=0, max_size=12).filter(lambda b: b"&" not in b), max_size=8))
    def test_other_parameters_are_kept_as_sent(self, pieces: list[bytes]) -> None:
        printable = [p for p in pieces if all(0x21 <= b < 0x7F and b not in b'"#<>[\\]^`{|}' for b in p)]
        query = b"&".join(printable)
        target = rules.parse_target(b"/a.bin", query)
        self.assertEqual(target.origin_query, query.decode("ascii"))


class NumberProperties(SynchronousTestCase):
    @PROPERTY
    @given(st.one_of(numberish, header_text, digits), st.one_of(st.none(), numberish, digits))
    def test_seek_values(self, start: str, end: Any) -> None:
        seek = client_error(lambda: rules.parse_seek(start, end))
        if seek is not None:
            self.assertTrue(start == "" or start.isascii())

    @PROPERTY
    @given(st.one_of(numberish, header_text, digits))
    def test_byte_offsets(self, value: str) -> None:
        offset = client_error(lambda: rules.parse_byte_offset(value))
        if offset is not None:
            self.assertTrue(0 <= offset < 10**19)

    @PROPERTY
    @given(st.one_of(rangeish, header_text, digits.map(lambda d: f"bytes={d}-"), digits.map(lambda d: f"bytes=-{d}")),
           st.integers(min_value=0, max_value=2**40))
    def test_ranges(self, value: str, length: int) -> None:
        byte_range = client_error(lambda: rules.parse_range(value, length))
        if byte_range is not None:
            self.assertTrue(0 <= byte_range[0] <= byte_range[1] < length)
        hint = rules.range_hint(value)
        if hint is not None:
            self.assertTrue(-rules.HUGE <= hint[0] < rules.HUGE)


class ConditionalProperties(SynchronousTestCase):
    @PROPERTY
    @given(st.one_of(st.none(), header_text), st.one_of(st.none(), header_text, digits),
           st.one_of(st.none(), header_text), st.one_of(st.none(), header_text))
    def test_conditionals_are_true_or_false(self, inm: Any, ims: Any, etag: Any, last_modified: Any) -> None:
        self.assertIn(rules.not_modified(inm, ims, etag, last_modified), (True, False))
        self.assertIn(rules.range_applies(inm, etag, last_modified), (True, False))

    @PROPERTY
    @given(st.one_of(header_text, digits, st.from_regex(
        r"\A(Mon|Sun), [0-9]{2} (Jan|Nov) [0-9]{4,6} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT\Z")))
    def test_request_dates(self, value: str) -> None:
        when = rules.parse_request_date(value)
        self.assertTrue(when is None or isinstance(when, float))


class ViaProperties(SynchronousTestCase):
    @PROPERTY
    @given(st.lists(header_text.filter(lambda t: "\r" not in t and "\n" not in t and "\x00" not in t), max_size=4))
    def test_any_via_is_names_or_nothing(self, values: list[str]) -> None:
        from h264edge import tiers

        self.assertIsInstance(tiers.is_loop("edge-1", values), bool)
        onward = tiers.via_onward("edge-1", values)
        self.assertTrue(onward.endswith("1.1 edge-1"))
        self.assertLessEqual(len(onward), tiers.MAX_VIA + 20)


class HeadProperties(SynchronousTestCase):
    @PROPERTY
    @given(st.binary(max_size=400))
    def test_any_head_is_plain_or_not(self, data: bytes) -> None:
        parsed = plain_get_target(b"GET /" + data)
        if parsed is not None:
            self.assertTrue(parsed[0].startswith(b"/"))

    @PROPERTY
    @given(st.text(max_size=80))
    def test_any_listen_description_is_an_address_or_a_usage_error(self, description: str) -> None:
        for text in (description, "tcp:" + description, "tcp6:" + description):
            try:
                interface, port, backlog = tcp_listen_address(text)
            except usage.UsageError:
                continue
            self.assertTrue(0 <= port <= 65535 and 1 <= backlog <= 65535)


class GrammarTests(SynchronousTestCase):
    def test_the_two_cases_of_the_issue(self) -> None:
        self.assertRaises(rules.Unsatisfiable, rules.parse_range, "bytes=" + "9" * 5000 + "-", 100)
        target = rules.parse_target(b"/x.flv", b"start=%C2%B2")
        self.assertRaises(rules.BadRequest, rules.parse_byte_offset, target.start)
        self.assertRaises(rules.BadRequest, rules.parse_seek, target.start, None)

    def test_other_digits_are_not_digits(self) -> None:
        for value in ("\u00b2", "\u0661", "\uff11", "1\u00b2", "\u0661.5"):
            self.assertRaises(rules.BadRequest, rules.parse_byte_offset, value)
            self.assertRaises(rules.BadRequest, rules.parse_seek, value, None)
            self.assertIsNone(rules.parse_range(f"bytes={value}-", 100))

    def test_seconds(self) -> None:
        for value, seconds in (("12", 12.0), ("12.5", 12.5), (".5", 0.5), ("5.", 5.0), ("1e3", 1000.0),
                               ("0012", 12.0), ("1E-2", 0.01)):
            self.assertEqual(rules.parse_seconds("start", value), seconds)
        for value in ("-1", "+1", " 1", "1 ", "1_0", "nan", "inf", "1e999", "0x10", ".", "e5", "1e", "1e1234",
                      "1" * 21, "1." + "1" * 21):
            self.assertRaises(rules.BadRequest, rules.parse_seconds, "start", value)

    def test_positions_too_long_for_any_object(self) -> None:
        huge = "9" * 5000
        self.assertEqual(rules.parse_range(f"bytes=0-{huge}", 100), (0, 99))
        self.assertEqual(rules.parse_range(f"bytes=-{huge}", 100), (0, 99))
        self.assertEqual(rules.parse_range("bytes=" + "0" * 5000 + "5-", 100), (5, 99))
        self.assertIsNone(rules.range_hint(f"bytes={huge}-"))

    def test_request_dates(self) -> None:
        imf = rules.parse_request_date("Sun, 06 Nov 1994 08:49:37 GMT")
        self.assertEqual(imf, 784111777.0)
        self.assertEqual(rules.parse_request_date("Sunday, 06-Nov-94 08:49:37 GMT"), imf)
        self.assertEqual(rules.parse_request_date("Sun Nov  6 08:49:37 1994"), imf)
        for bad in ("Sun, 31 Feb 1994 08:49:37 GMT", "Sun, 06 Nov 1994 25:49:37 GMT", "Sun, 06 Nov 99999 08:49:37 GMT",
                    "Sun, \u0660\u0666 Nov 1994 08:49:37 GMT", "9" * 5000, "Sun, 06 Nov 1994 08:49:37 UTC", ""):
            self.assertIsNone(rules.parse_request_date(bad), bad)

    def test_query_bytes_that_cannot_travel_raw_are_escaped(self) -> None:
        target = rules.parse_target(b"/a.bin", b'x=\xff\x00 "#<>[\\]^`{|}&y=%ff')
        self.assertEqual(target.origin_query, "x=%FF%00%20%22%23%3C%3E%5B%5C%5D%5E%60%7B%7C%7D&y=%ff")
        raw = rules._QUERY_RAW
        self.assertEqual({b for b in range(256) if rules._QUERY_PLAIN.fullmatch(bytes([b]))}, set(raw))

    def test_query_pieces_named_start_after_decoding(self) -> None:
        target = rules.parse_target(b"/a.mp4", b"st%61rt=5&x=1&END=3&end=%37")
        self.assertEqual((target.start, target.end, target.origin_query), ("5", "7", "x=1&END=3"))
        self.assertEqual(rules.parse_target(b"/a.mp4", b"start=5").key, "/a.mp4")

    def test_excerpts_are_short_and_printable(self) -> None:
        self.assertEqual(rules.excerpt("abc"), '"abc"')
        self.assertEqual(rules.excerpt('a"\\\n\xff'), '"a\\x22\\x5c\\x0a\\xff"')
        self.assertEqual(rules.excerpt("x" * 100, 5), '"xxxxx"...')
        self.assertEqual(rules.excerpt("\u2028"), '"\\xe2\\x80\\xa8"')
