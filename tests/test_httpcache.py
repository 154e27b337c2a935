"""
The edge's HTTP cache rules (L{h264edge.httpcache}), one test per rule, each naming the RFC section
it follows; and property tests: any text an origin can send gives a value or a clean HeaderError.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from h264edge.httpcache import (
    INVALID,
    MAX_HEADER_BLOCK,
    ContentRange,
    HeaderError,
    check_framing,
    check_partial,
    forwarded_request_fields,
    initial_age,
    not_modified_fields,
    parse_age,
    parse_cache_control,
    parse_content_range,
    parse_delta_seconds,
    parse_etag_list,
    parse_http_date,
    parse_targeted,
    parse_vary,
    request_directives,
    response_policy,
    secondary_key,
    stored_fields,
    updated_fields,
    variant_key,
)

NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
DATE = "Tue, 14 Nov 2023 22:13:20 GMT"
HOUR_AGO = "Tue, 14 Nov 2023 21:13:20 GMT"
DAY = 86400.0


def policy(status: int = 200, *fields: tuple[str, str], **kwargs: object):  # type: ignore[no-untyped-def]
    kwargs.setdefault("response_time", NOW)
    kwargs.setdefault("default_ttl", 3600.0)
    return response_policy(status, tuple(fields), **kwargs)  # type: ignore[arg-type]

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
    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_any_text_parses_or_is_refused_cleanly(self, value: str) -> None:
        try:
            parsed = parse_content_range(value)
        except HeaderError:
            return
        if parsed.first is not None:
            assert parsed.last is not None and parsed.first <= parsed.last
            assert parsed.total is None or parsed.total > parsed.last


class FramingTests(SynchronousTestCase):
    def test_trusted_framings(self) -> None:
        """RFC 9112 §6, RFC 9110 §8.6: chunked alone, one Content-Length (repeated lines of it too)."""
        check_framing((("Transfer-Encoding", "chunked"),))
        check_framing((("Content-Length", "10"), ("Content-Length", "10")))
        check_framing((("Content-Length", "10, 10"), ("Connection", "keep-alive")))
        check_framing(())

    def test_untrusted_framings(self) -> None:
        """RFC 9112 §6.1, §6.3: other codings, Transfer-Encoding with Content-Length, differing lengths."""
        for fields in ((("Transfer-Encoding", "gzip, chunked"),), (("Transfer-Encoding", "chunked2"),),
                       (("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")),
                       (("Transfer-Encoding", "chunked"), ("Content-Length", "5")),
                       (("Content-Length", "5"), ("Content-Length", "6")), (("Content-Length", "5, 6"),),
                       (("Content-Length", "+5"),), (("Content-Length", "٥"),)):
            self.assertRaises(HeaderError, check_framing, fields)

    @given(st.lists(st.tuples(st.sampled_from(["Transfer-Encoding", "Content-Length", "Connection"]), header_like),
                    max_size=4))
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_any_fields_pass_or_are_refused_cleanly(self, fields: list[tuple[str, str]]) -> None:
        try:
            check_framing(tuple(fields))
        except HeaderError:
            pass


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


class HttpDateTests(SynchronousTestCase):
    def test_the_three_formats(self) -> None:
        """RFC 9110 §5.6.7: IMF-fixdate, RFC 850 and asctime all mean the same instant."""
        for value in ("Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"):
            self.assertEqual(parse_http_date(value, NOW), 784111777.0, value)

    def test_two_digit_years_more_than_50_years_ahead_are_last_century(self) -> None:
        """RFC 9110 §5.6.7: an rfc850 year that looks more than 50 years ahead is the century before."""
        self.assertEqual(parse_http_date("Tuesday, 01-Jan-80 00:00:00 GMT", NOW), 315532800.0)  # not 2080
        self.assertEqual(parse_http_date("Friday, 01-Jan-49 00:00:00 GMT", NOW), 2493072000.0)

    def test_other_forms_are_not_dates(self) -> None:
        """RFC 9110 §5.6.7: other zones, dashes with four-digit years, ISO dates, impossible days are invalid."""
        for value in ("Tue, 14 Nov 2023 22:13:20 UTC", "Tue, 14-Nov-2023 22:13:20 GMT", "2023-11-14T22:13:20Z",
                      "Tue, 14 Nov 23 22:13:20 GMT", "Tue, 31 Feb 2023 22:13:20 GMT", "Tue, 14 Nov 2023 24:00:00 GMT",
                      "0", "", "Tue, 14 Nov 2023 22:13:20 GMT junk", "Tue, ١٤ Nov 2023 22:13:20 GMT"):
            self.assertIsNone(parse_http_date(value, NOW), value)

    def test_year_0000_is_not_a_date(self) -> None:
        """
        A four-digit year of 0000 follows the grammar but names no day (Python's calendar starts at
        year 1): not a date, never an exception (it raised ValueError, a 500 for an origin's Date).
        """
        for value in ("Sat, 01 Jan 0000 00:00:00 GMT", "Sat Jan  1 00:00:00 0000"):
            self.assertIsNone(parse_http_date(value, NOW), value)
            self.assertIsNone(parse_http_date(value), value)
        self.assertEqual(parse_http_date("Mon, 01 Jan 0001 00:00:00 GMT", NOW), -62135596800.0)

    @given(header_like)
    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_any_text_is_a_date_or_none(self, value: str) -> None:
        result = parse_http_date(value, NOW)
        assert result is None or isinstance(result, float)


class DeltaSecondsTests(SynchronousTestCase):
    def test_digits_only_capped(self) -> None:
        """RFC 9111 §1.2.2: delta-seconds is digits; a value too large is taken as 2**31."""
        self.assertEqual(parse_delta_seconds("60"), 60)
        self.assertEqual(parse_delta_seconds("9" * 40), 2**31)
        for value in ("-1", "5.0", " 5", "+5", "٥", "0x10", ""):
            self.assertIsNone(parse_delta_seconds(value), value)

    def test_age(self) -> None:
        """RFC 9111 §5.1: Age is one delta-seconds; anything else is ignored (0)."""
        self.assertEqual(parse_age(["7200"]), 7200)
        self.assertEqual(parse_age(["5, 6"]), 0)
        self.assertEqual(parse_age(["-3"]), 0)
        self.assertEqual(parse_age([]), 0)

    @given(st.lists(header_like, max_size=3))
    @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_any_age_is_a_number(self, field_values: list[str]) -> None:
        assert 0 <= parse_age(field_values) <= 2**31


class CacheControlTests(SynchronousTestCase):
    def test_directives_and_arguments(self) -> None:
        """RFC 9111 §5.2: token [= token / quoted-string], names case-insensitive, commas in quotes kept."""
        parsed = parse_cache_control(['Public, Max-Age=60', 'no-cache="Set-Cookie, X-A", s-maxage="30"'])
        self.assertEqual(parsed, {"public": None, "max-age": "60", "no-cache": "Set-Cookie, X-A", "s-maxage": "30"})

    def test_bad_syntax_and_conflicts_are_invalid(self) -> None:
        """RFC 9111 §4.2.1: duplicated directives with other values, and invalid ones, are invalid."""
        parsed = parse_cache_control(["max-age = 5, s-maxage=1, s-maxage=2, max-stale=1, max-stale=1"])
        self.assertEqual(parsed, {"max-age": INVALID, "s-maxage": INVALID, "max-stale": "1"})

    @given(st.lists(header_like, max_size=3))
    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_any_text_gives_directives(self, field_values: list[str]) -> None:
        for name, value in parse_cache_control(field_values).items():
            assert name == name.lower() and (value is None or value is INVALID or isinstance(value, str))


class TargetedCacheControlTests(SynchronousTestCase):
    def test_a_structured_dictionary(self) -> None:
        """RFC 9213 §2: CDN-Cache-Control is an RFC 8941 Dictionary of cache directives."""
        self.assertEqual(parse_targeted(['max-age=60, no-transform, stale-if-error="5";x=1']),
                         {"max-age": "60", "no-transform": None, "stale-if-error": "5"})

    def test_not_a_dictionary_is_ignored(self) -> None:
        """RFC 9213 §2.1: a targeted field that fails to parse is ignored (Cache-Control applies)."""
        for value in ("Max-Age=60", "max-age=60,", "max-age = 60", "max-age=1234567890123456", "", "a=b c"):
            self.assertIsNone(parse_targeted([value]), value)

    @given(st.lists(header_like, max_size=3))
    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_any_text_gives_directives_or_none(self, field_values: list[str]) -> None:
        parsed = parse_targeted(field_values)
        assert parsed is None or all(isinstance(name, str) for name in parsed)


class StorabilityTests(SynchronousTestCase):
    def test_no_store_and_private_are_not_stored(self) -> None:
        """RFC 9111 §3, §5.2.2.5, §5.2.2.7: a shared cache never stores no-store or private answers."""
        self.assertFalse(policy(200, ("Cache-Control", "no-store")).store)
        self.assertFalse(policy(200, ("Cache-Control", 'private="Set-Cookie", max-age=60')).store)

    def test_must_understand_overrides_no_store_for_known_statuses(self) -> None:
        """RFC 9111 §5.2.2.3: a cache that understands the status ignores no-store next to must-understand."""
        self.assertTrue(policy(200, ("Cache-Control", "must-understand, no-store, max-age=60")).store)

    def test_authorization_needs_public_s_maxage_or_must_revalidate(self) -> None:
        """RFC 9111 §3.5: an answer to a request with Authorization is stored only when it says so."""
        self.assertFalse(policy(200, ("Cache-Control", "max-age=60"), authorized=True).store)
        for cc in ("public", "s-maxage=60", "must-revalidate, max-age=60"):
            self.assertTrue(policy(200, ("Cache-Control", cc), authorized=True).store, cc)

    def test_vary_star_is_never_stored(self) -> None:
        """RFC 9111 §4.1: Vary: * never matches, so storing it is useless."""
        self.assertFalse(policy(200, ("Vary", "Accept, *")).store)

    def test_set_cookie_is_not_stored_unless_asked(self) -> None:
        """nginx's rule (the edge's choice): Set-Cookie answers pass through; with the option, kept without it."""
        self.assertFalse(policy(200, ("Set-Cookie", "a=1"), ("Cache-Control", "max-age=60")).store)
        kept = policy(200, ("Set-Cookie", "a=1"), ("Cache-Control", "max-age=60"), store_set_cookie=True)
        self.assertEqual((kept.store, kept.strip), (True, frozenset({"set-cookie"})))

    def test_heuristically_cacheable_statuses(self) -> None:
        """RFC 9110 §15.1, RFC 9111 §4.2.2: 301/404/410... stored with heuristic freshness; others need explicit."""
        for status in (301, 404, 410, 501):
            self.assertTrue(policy(status, ("Last-Modified", HOUR_AGO)).store, status)
        for status in (302, 307, 403):
            self.assertFalse(policy(status, ("Last-Modified", HOUR_AGO)).store, status)
            self.assertTrue(policy(status, ("Cache-Control", "max-age=60")).store, status)
        self.assertTrue(policy(302, ("Cache-Control", "public"), ("Last-Modified", HOUR_AGO)).store)

    def test_server_errors_are_never_stored(self) -> None:
        """The edge's choice: 5xx answers are relayed, never kept (an outage must not outlive itself)."""
        for status in (500, 502, 503, 504):
            self.assertFalse(policy(status, ("Cache-Control", "max-age=60")).store, status)

    def test_request_no_store(self) -> None:
        """RFC 9111 §5.2.1.5: a request's no-store keeps its answer out of the cache."""
        self.assertFalse(policy(200, ("Cache-Control", "max-age=60"), request_no_store=True).store)


class FreshnessTests(SynchronousTestCase):
    def test_s_maxage_beats_max_age_beats_expires(self) -> None:
        """RFC 9111 §4.2.1: a shared cache takes s-maxage, then max-age, then Expires - Date."""
        self.assertEqual(policy(200, ("Cache-Control", "max-age=10, s-maxage=99")).lifetime, 99)
        self.assertEqual(policy(200, ("Cache-Control", "max-age=10"), ("Expires", "Thu, 01 Jan 2099 00:00:00 GMT"))
                         .lifetime, 10)
        self.assertEqual(policy(200, ("Expires", "Tue, 14 Nov 2023 22:14:20 GMT"), ("Date", DATE)).lifetime, 60)

    def test_invalid_expires_means_already_expired(self) -> None:
        """RFC 9111 §5.3: an invalid Expires (another zone, two-digit year, dashes, 0) is in the past."""
        for value in ("0", "Thu, 01 Jan 2099 00:00:00 UTC", "Thu, 01 Jan 99 00:00:00 GMT",
                      "Thu, 01-Jan-2099 00:00:00 GMT"):
            result = policy(200, ("Expires", value))
            self.assertEqual((result.store, result.lifetime, result.heuristic), (True, 0.0, False), value)

    def test_invalid_max_age_is_stale(self) -> None:
        """RFC 9111 §4.2.1: invalid freshness information (max-age=5.0, spaces, conflicts) means stale."""
        for cc in ("max-age=5.0", "max-age = 5", "max-age=-1", "max-age=5, max-age=6", "max-age"):
            self.assertEqual(policy(200, ("Cache-Control", cc)).lifetime, 0.0, cc)
        self.assertEqual(policy(200, ("Cache-Control", 'max-age="5"')).lifetime, 5.0)  # §5.2: quoted accepted

    def test_no_cache_stores_but_always_revalidates(self) -> None:
        """RFC 9111 §5.2.2.4: no-cache may be stored, never used without validation, never served stale."""
        result = policy(200, ("Cache-Control", "no-cache, max-age=600"))
        self.assertEqual((result.store, result.lifetime, result.revalidate), (True, 0.0, True))

    def test_heuristic_freshness_is_a_tenth_of_the_age_capped(self) -> None:
        """RFC 9111 §4.2.2: 10% of the time since Last-Modified, at most --default-ttl."""
        result = policy(200, ("Date", DATE), ("Last-Modified", HOUR_AGO))
        self.assertEqual((result.lifetime, result.heuristic), (360.0, True))
        self.assertEqual(policy(200, ("Last-Modified", "Sun, 06 Nov 1994 08:49:37 GMT")).lifetime, 3600.0)

    def test_default_ttl_without_any_freshness_information(self) -> None:
        """The operator's override: no explicit freshness and no Last-Modified gets --default-ttl (200 only)."""
        self.assertEqual(policy(200).lifetime, 3600.0)
        self.assertFalse(policy(404).store)

    def test_cdn_cache_control_takes_precedence(self) -> None:
        """RFC 9213 §2.1: a valid CDN-Cache-Control replaces Cache-Control and Expires for the edge."""
        result = policy(200, ("Cache-Control", "no-store"), ("Expires", "0"), ("CDN-Cache-Control", "max-age=600"))
        self.assertEqual((result.store, result.lifetime), (True, 600.0))
        self.assertFalse(policy(200, ("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "no-store")).store)
        ignored = policy(200, ("Cache-Control", "max-age=60"), ("CDN-Cache-Control", "Max-Age=600"))
        self.assertEqual(ignored.lifetime, 60.0)

    def test_stale_windows(self) -> None:
        """RFC 5861 §3, §4: stale-while-revalidate and stale-if-error windows."""
        result = policy(200, ("Cache-Control", "max-age=60, stale-while-revalidate=30, stale-if-error=600"))
        self.assertEqual((result.stale_while_revalidate, result.stale_if_error, result.revalidate), (30.0, 600.0, False))
        self.assertIsNone(policy(200, ("Cache-Control", "max-age=60")).stale_if_error)

    def test_must_revalidate_and_proxy_revalidate_forbid_stale(self) -> None:
        """RFC 9111 §4.2.4, §5.2.2.2, §5.2.2.8, §5.2.2.10: no stale answer when these (or s-maxage) say so."""
        for cc in ("max-age=60, must-revalidate", "max-age=60, proxy-revalidate", "s-maxage=60"):
            self.assertTrue(policy(200, ("Cache-Control", cc)).revalidate, cc)
        self.assertFalse(policy(200, ("Cache-Control", "s-maxage=60, stale-if-error=60")).revalidate)
        self.assertFalse(policy(200, ("Cache-Control", "max-age=60")).revalidate)


class AgeTests(SynchronousTestCase):
    def test_the_origins_age_counts(self) -> None:
        """RFC 9111 §4.2.3: Age 7200 with max-age 3600 is already stale."""
        age = initial_age((("Age", "7200"), ("Date", DATE)), NOW - 0.5, NOW)
        self.assertEqual(age, 7200.5)  # the Age plus the time the request took
        lifetime = policy(200, ("Cache-Control", "max-age=3600")).lifetime
        self.assertLess(lifetime - age, 0)

    def test_apparent_age_by_date(self) -> None:
        """RFC 9111 §4.2.3: a Date in the past makes the answer older (by whole seconds past the Date's)."""
        self.assertEqual(initial_age((("Date", HOUR_AGO),), NOW, NOW), 3599.0)
        self.assertAlmostEqual(initial_age((("Date", DATE),), NOW, NOW + 0.9), 0.9, places=5)  # the request's time
        self.assertEqual(initial_age((("Date", "Thu, 01 Jan 2099 00:00:00 GMT"),), NOW, NOW), 0.0)


class RequestDirectiveTests(SynchronousTestCase):
    def test_request_directives(self) -> None:
        """RFC 9111 §5.2.1: only-if-cached, no-store, no-cache, max-age=0, min-fresh."""
        parsed = request_directives((("Cache-Control", "only-if-cached, max-age=0, min-fresh=5"),))
        self.assertEqual((parsed.only_if_cached, parsed.no_cache, parsed.max_age, parsed.min_fresh), (True, True, 0, 5))
        self.assertTrue(request_directives((("Cache-Control", "no-store"),)).no_store)

    def test_pragma_only_without_cache_control(self) -> None:
        """RFC 9111 §5.4: Pragma: no-cache counts only where there is no Cache-Control."""
        self.assertTrue(request_directives((("Pragma", "no-cache"),)).no_cache)
        self.assertFalse(request_directives((("Pragma", "no-cache"), ("Cache-Control", "max-age=5"))).no_cache)


class VaryTests(SynchronousTestCase):
    def test_names(self) -> None:
        """RFC 9110 §12.5.5: Vary lists field names (any case) or is *."""
        self.assertEqual(parse_vary(["Accept-Encoding, accept-language", "X-Foo"]),
                         ("accept-encoding", "accept-language", "x-foo"))
        self.assertIsNone(parse_vary(["Accept, *"]))
        self.assertEqual(parse_vary([]), ())

    def test_secondary_keys_are_normalised(self) -> None:
        """RFC 9111 §4.1: field lines combined, whitespace and (where the field allows) case folded."""
        vary = ("accept-encoding", "x-foo")
        one = secondary_key(vary, (("Accept-Encoding", "GZIP,  br"), ("X-Foo", "1")))
        two = secondary_key(vary, (("accept-encoding", "gzip"), ("accept-encoding", "br"), ("x-foo", "1")))
        self.assertEqual(one, two)
        self.assertNotEqual(one, secondary_key(vary, (("Accept-Encoding", "gzip, br"), ("X-Foo", "2"))))
        self.assertNotEqual(secondary_key(("x-foo",), ()), secondary_key(("x-foo",), (("X-Foo", ""),)))

    def test_variant_keys_differ_by_generation(self) -> None:
        self.assertNotEqual(variant_key("/a", "0" * 16, "k"), variant_key("/a", "1" * 16, "k"))
        self.assertTrue(variant_key("/a", "0" * 16, "k").startswith("/a\x00"))

    @given(st.lists(header_like, max_size=3), st.lists(st.tuples(header_like, header_like), max_size=4))
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_any_text_gives_names_and_a_key(self, field_values: list[str], request: list[tuple[str, str]]) -> None:
        names = parse_vary(field_values)
        if names is not None:
            assert isinstance(secondary_key(names, tuple(request)), str)


class EntityTagListTests(SynchronousTestCase):
    def test_commas_inside_quotes(self) -> None:
        """RFC 9110 §8.8.3: a comma inside an entity-tag's quotes is part of it."""
        self.assertEqual(parse_etag_list('"a,b", W/"c" ,"d"'), ['"a,b"', 'W/"c"', '"d"'])
        self.assertEqual(parse_etag_list(" * "), "*")

    def test_malformed_lists(self) -> None:
        for value in ('"a', 'a', '"a" "b"', '"a"x', 'W/ "a"', "", '"a\x00"', "*, \"a\""):
            self.assertRaises(HeaderError, parse_etag_list, value)

    @given(header_like)
    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_any_text_gives_tags_or_a_clean_error(self, value: str) -> None:
        try:
            tags = parse_etag_list(value)
        except HeaderError:
            return
        assert tags == "*" or all(tag.endswith('"') for tag in tags)


class HeaderBlockTests(SynchronousTestCase):
    def test_hop_by_hop_and_edge_fields_are_not_stored(self) -> None:
        """RFC 9110 §7.6.1, RFC 9111 §3.1: Connection and what it names, Keep-Alive, TE... are not stored."""
        block = stored_fields((
            ("Connection", "X-Hop, close"), ("X-Hop", "1"), ("Keep-Alive", "5"), ("Transfer-Encoding", "chunked"),
            ("Proxy-Authenticate", "x"), ("Upgrade", "h2c"), ("Content-Length", "5"), ("Content-Range", "x"),
            ("Age", "3"), ("X-Cache", "HIT"), ("Access-Control-Allow-Origin", "*"), ("Link", "</a>; rel=preload"),
            ("ETag", '"e"'), ("Content-Type", "video/mp4"),
        ), date=DATE)
        self.assertEqual(block, (("Access-Control-Allow-Origin", "*"), ("Link", "</a>; rel=preload"),
                                 ("Date", DATE)))

    def test_the_block_has_a_cap(self) -> None:
        """The edge's limit: a header block over 64 KiB is refused (the viewer gets 502)."""
        self.assertRaises(HeaderError, stored_fields, tuple((f"X-{i}", "v" * 1000) for i in range(70)))
        stored_fields(tuple((f"X-{i}", "v" * 1000) for i in range(60)))
        self.assertEqual(MAX_HEADER_BLOCK, 65536)

    def test_a_304_updates_the_stored_fields(self) -> None:
        """RFC 9111 §3.2, §4.3.4: each field of the 304 replaces the stored ones of that name."""
        stored = (("Cache-Control", "max-age=1"), ("X-A", "1"), ("X-A", "2"), ("X-B", "b"), ("Date", HOUR_AGO))
        fresh = (("Cache-Control", "max-age=60"), ("X-A", "3"), ("Date", DATE), ("ETag", '"other"'),
                 ("Content-Length", "0"), ("Connection", "keep-alive"))
        self.assertEqual(updated_fields(stored, fresh), (("X-B", "b"), ("Cache-Control", "max-age=60"), ("X-A", "3"),
                                                        ("Date", DATE)))

    def test_a_304_to_a_viewer_carries_what_caches_need(self) -> None:
        """RFC 9110 §15.4.5: Cache-Control, Content-Location, Date, ETag, Expires, Vary."""
        stored = (("Cache-Control", "max-age=1"), ("Vary", "Accept"), ("Link", "x"), ("Date", DATE))
        self.assertEqual(not_modified_fields(stored), (("Cache-Control", "max-age=1"), ("Vary", "Accept"),
                                                       ("Date", DATE)))

    def test_forwarded_request_fields(self) -> None:
        """RFC 9110 §7.6: end-to-end fields go on, with X-Forwarded-For and Via; hop-by-hop ones and those
        the fill sets itself (Range, conditionals, Accept-Encoding, Host) do not."""
        fields = (("Host", "edge"), ("User-Agent", "ua"), ("Cookie", "c=1"), ("Authorization", "Bearer x"),
                  ("Range", "bytes=0-1"), ("If-None-Match", '"e"'), ("Accept-Encoding", "gzip"),
                  ("Connection", "X-Secret"), ("X-Secret", "s"), ("TE", "trailers"), ("X-Forwarded-For", "10.0.0.1"),
                  ("Via", "1.0 browser-proxy"), ("Accept", "*/*"))
        self.assertEqual(forwarded_request_fields(fields, "192.0.2.7", "1.1 edge1"), (
            ("User-Agent", "ua"), ("Cookie", "c=1"), ("Authorization", "Bearer x"), ("Accept", "*/*"),
            ("X-Forwarded-For", "10.0.0.1, 192.0.2.7"), ("Via", "1.0 browser-proxy, 1.1 edge1")))

    @given(st.lists(st.tuples(st.from_regex(r"[A-Za-z-]{1,12}", fullmatch=True), header_like), max_size=8))
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_any_fields_give_a_block_or_a_clean_error(self, fields: list[tuple[str, str]]) -> None:
        try:
            block = stored_fields(tuple(fields), date=DATE)
        except HeaderError:
            return
        updated_fields(block, tuple(fields))
        forwarded_request_fields(tuple(fields), None, "1.1 e")
        response_policy(200, tuple(fields), response_time=NOW, default_ttl=60.0)
        request_directives(tuple(fields))
