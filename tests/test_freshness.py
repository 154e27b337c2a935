"""Freshness of origin answers (RFC 9111 for a shared cache)."""

from twisted.trial.unittest import SynchronousTestCase

from h264edge.freshness import Freshness, freshness

NOW = 1_700_000_000.0


class FreshnessTests(SynchronousTestCase):
    def test_s_maxage_beats_max_age(self) -> None:
        self.assertEqual(freshness("max-age=10, s-maxage=99", None, None, NOW, 5), Freshness(True, 99))

    def test_max_age_beats_expires(self) -> None:
        self.assertEqual(freshness("max-age=10", "Thu, 01 Jan 2099 00:00:00 GMT", None, NOW, 5), Freshness(True, 10))

    def test_no_store_and_private_are_not_stored(self) -> None:
        self.assertFalse(freshness("no-store", None, None, NOW, 5).storable)
        self.assertFalse(freshness("private, max-age=60", None, None, NOW, 5).storable)

    def test_no_cache_stores_but_revalidates(self) -> None:
        self.assertEqual(freshness("no-cache", None, None, NOW, 5), Freshness(True, 0))

    def test_expires_relative_to_date(self) -> None:
        result = freshness(None, "Tue, 14 Nov 2023 22:14:20 GMT", "Tue, 14 Nov 2023 22:13:20 GMT", NOW, 5)
        self.assertEqual(result, Freshness(True, 60))

    def test_invalid_expires_means_already_expired(self) -> None:
        self.assertEqual(freshness(None, "0", None, NOW, 5), Freshness(True, 0))

    def test_default_ttl_when_origin_says_nothing(self) -> None:
        self.assertEqual(freshness(None, None, None, NOW, 3600), Freshness(True, 3600))

    def test_bad_max_age_is_zero(self) -> None:
        self.assertEqual(freshness("max-age=abc", None, None, NOW, 5), Freshness(True, 0))
