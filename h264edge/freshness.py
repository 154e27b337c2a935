# -*- test-case-name: tests.test_freshness -*-
"""
How long an origin answer may be served without asking again (RFC 9111, the parts a shared cache needs).

Pure: header values in, a L{Freshness} out.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Optional

from attrs import frozen


@frozen
class Freshness:
    storable: bool  # False for no-store / private: streamed to the viewer, never kept
    lifetime: float  # seconds from now; 0 = must revalidate before every use


def parse_http_date(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def cache_control(value: Optional[str]) -> dict[str, Optional[str]]:
    directives: dict[str, Optional[str]] = {}
    for item in (value or "").split(","):
        name, _, arg = item.strip().partition("=")
        if name:
            directives[name.lower()] = arg.strip().strip('"') if arg else None
    return directives


def _seconds(value: Optional[str]) -> Optional[int]:
    if value is None or not value.isdigit():
        return None
    return int(value)


def freshness(
    cache_control_value: Optional[str],
    expires: Optional[str],
    date: Optional[str],
    now: float,
    default_ttl: float,
) -> Freshness:
    """
    Freshness of one answer.  s-maxage beats max-age beats Expires beats the default TTL; no-cache means
    store but revalidate every time.  A shared cache never keeps no-store or private answers.
    """
    cc = cache_control(cache_control_value)
    if "no-store" in cc or "private" in cc:
        return Freshness(False, 0.0)
    if "no-cache" in cc:
        return Freshness(True, 0.0)
    for name in ("s-maxage", "max-age"):
        if name in cc:
            seconds = _seconds(cc[name])
            return Freshness(True, float(seconds) if seconds is not None else 0.0)
    if expires is not None:
        expires_at = parse_http_date(expires)
        if expires_at is None:
            return Freshness(True, 0.0)  # an invalid Expires means "already expired"
        base = parse_http_date(date) or now
        return Freshness(True, max(0.0, expires_at - base))
    return Freshness(True, default_ttl)
