"""The pure HTTP rules: paths and keys, seek parameters, Range, conditionals."""

from twisted.trial.unittest import SynchronousTestCase

from h264edge.web.http import (
    BadRequest,
    Unsatisfiable,
    not_modified,
    parse_byte_offset,
    parse_range,
    parse_seek,
    parse_target,
    range_applies,
    range_hint,
)

LM = "Tue, 14 Nov 2023 22:13:20 GMT"


class TargetTests(SynchronousTestCase):
    def test_key_drops_start_and_end_but_keeps_other_parameters(self) -> None:
        target = parse_target(b"/v/a.mp4", b"start=3&token=x&end=9")
        self.assertEqual((target.path, target.key, target.origin_query), ("/v/a.mp4", "/v/a.mp4?token=x", "token=x"))
        self.assertEqual((target.start, target.end, target.kind), ("3", "9", "mp4"))

    def test_start_and_end_belong_to_other_paths(self) -> None:
        target = parse_target(b"/list.json", b"start=3&end=9")
        self.assertEqual((target.key, target.start, target.end), ("/list.json?start=3&end=9", None, None))

    def test_ignore_query(self) -> None:
        self.assertEqual(parse_target(b"/a.flv", b"utm=1", keep_query=False).key, "/a.flv")

    def test_percent_encoding_is_normalised(self) -> None:
        self.assertEqual(parse_target(b"/a%20b/c%2Dd.mp4", b"").path, "/a%20b/c-d.mp4")

    def test_escapes_are_refused(self) -> None:
        for raw in (b"/../x", b"/a/%2e%2e/x", b"/a/%2E%2e/x", b"/a%2f..%2fx", b"/a/./x", b"/x%00", b"/a%5cb",
                    b"/a\\b", b"/%ff.mp4", b"/dir/", b"relative", b"/a/%0a"):
            self.assertRaises(BadRequest, parse_target, raw, b"")


class SeekParameterTests(SynchronousTestCase):
    def test_good_values(self) -> None:
        self.assertEqual(parse_seek("12.5", "20"), (12.5, 20.0))
        self.assertEqual(parse_seek(None, None), (0.0, None))
        self.assertEqual(parse_seek("", "3"), (0.0, 3.0))

    def test_bad_values(self) -> None:
        for start, end in (("-1", None), ("nan", None), ("inf", None), ("abc", None), ("5", "5"),
                           ("5", "4"), (None, "0"), ("1e999", None), ("0x10", None)):
            self.assertRaises(BadRequest, parse_seek, start, end)

    def test_byte_offsets(self) -> None:
        self.assertEqual(parse_byte_offset("1234"), 1234)
        self.assertEqual(parse_byte_offset(None), 0)
        for bad in ("-1", "1.5", "abc", "9" * 30):
            self.assertRaises(BadRequest, parse_byte_offset, bad)


class RangeTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parse_range("bytes=0-9", 100), (0, 9))
        self.assertEqual(parse_range("bytes=90-", 100), (90, 99))
        self.assertEqual(parse_range("bytes=-10", 100), (90, 99))
        self.assertEqual(parse_range("bytes=-1000", 100), (0, 99))
        self.assertEqual(parse_range("bytes=50-1000", 100), (50, 99))

    def test_ignored_forms_answer_whole(self) -> None:
        for value in (None, "bytes=0-1,5-6", "items=0-1", "bytes=9-3", "bytes=x-y", "bytes=-"):
            self.assertIsNone(parse_range(value, 100))

    def test_unsatisfiable(self) -> None:
        self.assertRaises(Unsatisfiable, parse_range, "bytes=100-", 100)
        self.assertRaises(Unsatisfiable, parse_range, "bytes=-0", 100)
        self.assertRaises(Unsatisfiable, parse_range, "bytes=0-", 0)


class RangeHintTests(SynchronousTestCase):
    def test_where_a_miss_starts_fetching(self) -> None:
        self.assertEqual(range_hint("bytes=100-200"), (100, 200))
        self.assertEqual(range_hint("bytes=100-"), (100, None))
        self.assertEqual(range_hint("bytes=-500"), (-500, None))
        for value in (None, "bytes=-0", "bytes=0-1,5-6", "items=1-2", "bytes=9-3", "bytes=x-"):
            self.assertIsNone(range_hint(value))


class ConditionalTests(SynchronousTestCase):
    def test_if_none_match(self) -> None:
        self.assertTrue(not_modified('"a", "b"', None, '"b"', LM))
        self.assertTrue(not_modified('W/"b"', None, '"b"', LM))
        self.assertTrue(not_modified("*", None, '"b"', LM))
        self.assertFalse(not_modified('"c"', LM, '"b"', LM))  # If-None-Match wins over If-Modified-Since

    def test_if_modified_since(self) -> None:
        self.assertTrue(not_modified(None, LM, None, LM))
        self.assertFalse(not_modified(None, "Mon, 13 Nov 2023 00:00:00 GMT", None, LM))
        self.assertFalse(not_modified(None, "garbage", None, LM))

    def test_if_range_is_strong(self) -> None:
        self.assertTrue(range_applies(None, '"a"', LM))
        self.assertTrue(range_applies('"a"', '"a"', LM))
        self.assertFalse(range_applies('W/"a"', 'W/"a"', LM))
        self.assertFalse(range_applies('"b"', '"a"', LM))
        self.assertTrue(range_applies(LM, '"a"', LM))
        self.assertFalse(range_applies("Mon, 13 Nov 2023 00:00:00 GMT", '"a"', LM))


class SeekPlanCacheTests(SynchronousTestCase):
    def test_budget_evicts_least_recently_used(self) -> None:
        from h264edge.plan import Literal, Plan, Span
        from h264edge.web.resource import SeekPlanCache

        cache = SeekPlanCache(max_bytes=1000)
        plans = {name: Plan((Literal(bytes(300)), Span("k", 0, 10))) for name in "abc"}
        for name in "abc":
            cache.put((name,), plans[name])
        self.assertIsNone(cache.get(("a",)))  # 3 x 500 > 1000: the oldest went
        self.assertIs(cache.get(("b",)), plans["b"])
        cache.put(("d",), plans["a"])
        self.assertIsNone(cache.get(("c",)))
        self.assertIs(cache.get(("b",)), plans["b"])
        cache.put(("huge",), Plan((Literal(bytes(5000)),)))
        self.assertIsNone(cache.get(("huge",)))
        self.assertLessEqual(cache.size, 1000)
