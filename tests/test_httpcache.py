"""
The edge's HTTP cache rules (L{h264edge.httpcache}), one test per rule, each naming the RFC section
it follows; and property tests: any text an origin can send gives a value or a clean HeaderError.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from h264edge.httpcache import ContentRange, HeaderError, check_partial, parse_content_range

# what a header value can be after latin-1 decoding of arbitrary bytes
header_text = st.binary(max_size=200).map(lambda raw: raw.decode("latin-1"))
header_like = st.one_of(header_text, st.text(alphabet="bytes 0123456789-/*,=\"; \tWabcmxz", max_size=60))


class ContentRangeTests(SynchronousTestCase):
    def test_satisfied_range(self) -> None:
        """RFC 9110 §14.4: C{bytes first-last/complete-length}."""
        self.assertEqual(parse_content_range("bytes 0-99/1000"), ContentRange(0, 99, 1000))
        self.assertEqual(parse_content_range("BYTES 5-5/*").length, 1)

    def test_unsatisfied_range(self) -> None:
        """RFC 9110 §14.4: C{bytes */complete-length} (a 416's Content-Range)."""
        self.assertEqual(parse_content_range("bytes */1000"), ContentRange(None, None, 1000))

    def test_invalid_ranges_are_refused(self) -> None:
        """RFC 9110 §14.4: last before first, or complete length not above last, is invalid."""
        for value in ("bytes 5-2/1000", "bytes 0-1000/1000", "bytes 0-99/99", "bytes -5/10", "bytes 0-9",
                      "items 0-9/10", "bytes 0-9/10, bytes 0-9/10", "bytes */*", "bytes ٠-٩/١٠",
                      "bytes 0-1_0/100", "bytes +0-9/10", "bytes 0-9/" + "9" * 19):
            self.assertRaises(HeaderError, parse_content_range, value)

    @given(header_like)
    @settings(max_examples=500)
    def test_any_text_parses_or_is_refused_cleanly(self, value: str) -> None:
        try:
            parsed = parse_content_range(value)
        except HeaderError:
            return
        if parsed.first is not None:
            assert parsed.last is not None and parsed.first <= parsed.last
            assert parsed.total is None or parsed.total > parsed.last


class PartialAnswerTests(SynchronousTestCase):
    """A 206 must answer the range asked (RFC 9110 §15.3.7, §14.4)."""

    def test_exactly_the_asked_range(self) -> None:
        check_partial(100, 199, ContentRange(100, 199, 1000), 100)
        check_partial(0, None, ContentRange(0, 999, 1000), 1000)
        check_partial(0, 4095, ContentRange(0, 999, 1000), None)  # the object is shorter than asked

    def test_a_superset_is_used(self) -> None:
        check_partial(100, 199, ContentRange(0, 299, 1000), 300)

    def test_a_suffix_range(self) -> None:
        check_partial(-100, None, ContentRange(900, 999, 1000), 100)
        check_partial(-5000, None, ContentRange(0, 999, 1000), 1000)
        self.assertRaises(HeaderError, check_partial, -100, None, ContentRange(900, 998, 1000), 99)

    def test_other_bytes_than_asked_are_refused(self) -> None:
        for first, last, cr in ((0, None, ContentRange(5, 999, 1000)), (100, 199, ContentRange(100, 150, 1000)),
                                (100, 199, ContentRange(150, 199, 1000)), (2000, None, ContentRange(0, 999, 1000))):
            self.assertRaises(HeaderError, check_partial, first, last, cr, None)

    def test_content_length_must_be_the_range_length(self) -> None:
        self.assertRaises(HeaderError, check_partial, 0, 99, ContentRange(0, 99, 1000), 98)

    def test_unknown_total_or_unsatisfied_is_refused(self) -> None:
        self.assertRaises(HeaderError, check_partial, 0, 99, ContentRange(0, 99, None), 100)
        self.assertRaises(HeaderError, check_partial, 0, 99, ContentRange(None, None, 1000), 0)
