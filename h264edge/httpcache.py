# -*- test-case-name: tests.test_httpcache -*-
"""
The edge as an HTTP cache: pure rules over header fields (RFC 9110, RFC 9111, RFC 9213, RFC 5861).

No Twisted and no I/O here: header fields in, values out.  A field list is a tuple of C{(name,
value)} pairs as they came (names keep their case, values are latin-1 decoded text); lookups are
case-insensitive.  Every parser takes untrusted text from origins or viewers and either gives a
value or raises L{HeaderError} (or, where the RFC says what an invalid value means, gives that):
numbers are ASCII digit runs with length caps, never C{int()} of whatever came.

The decisions a shared cache makes are here, each a function: may this answer be stored
(L{response_policy}, RFC 9111 §3), how long is it fresh and may it be served stale (§4.2,
RFC 5861, RFC 9213), how old is it (L{initial_age}, §4.2.3), which stored answer does a request
select (L{parse_vary}, L{variant_key}, §4.1), what is kept and replayed of its header block
(L{stored_fields}, L{updated_fields}, §3.1, §3.2), and what a request forwards to the origin
(L{forwarded_request_fields}, RFC 9110 §7.6).
"""

from __future__ import annotations

import calendar
import json
import re
import time
from typing import Iterable, Optional, Sequence, Union

import attrs
from attrs import frozen

Fields = tuple[tuple[str, str], ...]

MAX_DIGITS = 18  # a count of bytes the edge takes from a header: below 10**18
DELTA_CAP = 2**31  # RFC 9111 §1.2.2: a larger delta-seconds is taken as 2**31
MAX_HEADER_BLOCK = 64 * 1024  # bytes of response header fields the edge stores and replays


class HeaderError(ValueError):
    """A header value that does not follow its grammar."""


def values(fields: Iterable[tuple[str, str]], name: str) -> list[str]:
    """Every value of field C{name} (any case), in order."""
    name = name.lower()
    size = len(name)  # a length check first: most fields are not the one looked for (~20 looks an answer)
    return [value for key, value in fields if len(key) == size and key.lower() == name]


def last_value(fields: Iterable[tuple[str, str]], name: str) -> Optional[str]:
    found = values(fields, name)
    return found[-1] if found else None


def _list_items(field_values: Iterable[str]) -> list[str]:
    """The elements of a comma-separated list (RFC 9110 §5.6.1), commas in quoted strings kept."""
    items: list[str] = []
    for value in field_values:
        for match in _LIST_ITEM.finditer(value):
            item = match.group(0).strip(" \t")
            if item:
                items.append(item)
    return items


_LIST_ITEM = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*"?)+')
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CTL = re.compile(r"[\x00\r\n]")


# -- framing of partial answers (RFC 9110 §8.6, §14.4) ---------------------------------------------

_DIGITS = rf"[0-9]{{1,{MAX_DIGITS}}}"
_CONTENT_LENGTH = re.compile(_DIGITS)
_CONTENT_RANGE = re.compile(rf"bytes[ \t]+(?:({_DIGITS})-({_DIGITS})/({_DIGITS}|\*)|\*/({_DIGITS}))", re.IGNORECASE)


@frozen
class ContentRange:
    """A parsed Content-Range: bytes C{first}..C{last} of C{total} (None where the header says C{*})."""

    first: Optional[int]
    last: Optional[int]
    total: Optional[int]

    @property
    def length(self) -> Optional[int]:
        return None if self.first is None or self.last is None else self.last - self.first + 1


def parse_content_range(value: str) -> ContentRange:
    """
    A Content-Range value (RFC 9110 §14.4): C{bytes F-L/T}, C{bytes F-L/*} or C{bytes */T}.

    @raise HeaderError: another syntax, C{L < F}, or C{T <= L} (an invalid byte range).
    """
    match = _CONTENT_RANGE.fullmatch(value.strip(" \t"))
    if match is None:
        raise HeaderError(f"bad Content-Range {value[:60]!r}")
    first_s, last_s, total_s, unsatisfied_s = match.groups()
    if unsatisfied_s is not None:
        return ContentRange(None, None, int(unsatisfied_s))
    first, last = int(first_s), int(last_s)
    total = None if total_s == "*" else int(total_s)
    if last < first:
        raise HeaderError(f"Content-Range {value[:60]!r} ends before it starts")
    if total is not None and total <= last:
        raise HeaderError(f"Content-Range {value[:60]!r} ends past its complete length")
    return ContentRange(first, last, total)


def check_framing(fields: Fields) -> None:
    """
    Whether an answer's framing fields (RFC 9112 §6) are ones the edge trusts its client to have
    read right: a Transfer-Encoding only of C{chunked} and then without Content-Length (RFC 9112
    §6.1: a sign of request smuggling), and Content-Length values that are one number
    (RFC 9110 §8.6).

    @raise HeaderError: anything else.
    """
    codings = [item.lower() for item in _list_items(values(fields, "Transfer-Encoding"))]
    lengths = {item for item in _list_items(values(fields, "Content-Length"))}
    if codings and codings != ["chunked"]:
        raise HeaderError(f"a transfer coding the edge does not take ({', '.join(codings)[:60]})")
    if codings and lengths:
        raise HeaderError("Transfer-Encoding with Content-Length")
    if len(lengths) > 1 or any(not _CONTENT_LENGTH.fullmatch(item) for item in lengths):
        raise HeaderError(f"Content-Length {', '.join(sorted(lengths))[:60]} is not one number")


def check_partial(
    asked_first: int, asked_last: Optional[int], content_range: ContentRange, content_length: Optional[int]
) -> None:
    """
    Whether a 206 answers the range asked: C{asked_first}..C{asked_last} (None: to the end; a negative
    C{asked_first} asks for the last C{-asked_first} bytes).  Its Content-Range must name a satisfied
    range of a known total that holds every asked byte (the asked range or a superset of it, which the
    caller cuts), and its Content-Length, when given, must be that range's length.

    @raise HeaderError: the answer does not answer what was asked, or disagrees with itself.
    """
    first, last, total = content_range.first, content_range.last, content_range.total
    if first is None or last is None:
        raise HeaderError("206 with an unsatisfied Content-Range")
    if total is None:
        raise HeaderError("206 without the complete length")
    if content_length is not None and content_length != last - first + 1:
        raise HeaderError(f"Content-Range {first}-{last} holds {last - first + 1} bytes, Content-Length says "
                          f"{content_length}")
    if asked_first < 0:
        want_first, want_last = max(0, total + asked_first), total - 1
    else:
        want_first = asked_first
        want_last = total - 1 if asked_last is None else min(asked_last, total - 1)
        if want_first >= total:
            raise HeaderError(f"206 for bytes {first}-{last}/{total}, asked from byte {asked_first}")
    if first > want_first or last < want_last:
        raise HeaderError(f"206 for bytes {first}-{last}/{total}, asked for {want_first}-{want_last}")


# -- dates and delta-seconds (RFC 9110 §5.6.7, RFC 9111 §1.2.2) -------------------------------------

_DAYS = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAYS = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH = "(" + "|".join(_MONTHS) + ")"
_TIME = r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
_IMF_FIXDATE = re.compile(rf"{_DAYS}, ([0-9]{{2}}) {_MONTH} ([0-9]{{4}}) {_TIME} GMT")
_RFC850 = re.compile(rf"{_LONG_DAYS}, ([0-9]{{2}})-{_MONTH}-([0-9]{{2}}) {_TIME} GMT")
_ASCTIME = re.compile(rf"{_DAYS} {_MONTH} ([0-9 ][0-9]) {_TIME} ([0-9]{{4}})")


def parse_http_date(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """
    An HTTP-date (RFC 9110 §5.6.7) as a POSIX time, or None if C{value} is absent or not one.

    The three formats recipients must accept: IMF-fixdate, the obsolete RFC 850 form (a two-digit
    year more than 50 years ahead of C{now} is the century before) and asctime.  Anything else
    (another time zone than GMT, ISO dates, dashes with four digits) is not a date.
    """
    if value is None:
        return None
    text = value.strip(" \t")
    known = _recent_dates.get(text)
    if known is not None:
        return known
    match = _IMF_FIXDATE.fullmatch(text)
    if match is not None:
        day, month, year, hour, minute, second = match.groups()
    else:
        match = _RFC850.fullmatch(text)
        if match is not None:
            day, month, short_year, hour, minute, second = match.groups()
            this_year = _year_of(now if now is not None else 0.0)
            year_n = this_year - this_year % 100 + int(short_year)
            if year_n > this_year + 50:
                year_n -= 100
            elif now is None and year_n < 1970:
                year_n += 100
            year = str(year_n)
        else:
            match = _ASCTIME.fullmatch(text)
            if match is None:
                return None
            month, day, hour, minute, second, year = match.groups()
        return _timestamp(int(year), _MONTHS.index(month) + 1, int(day), int(hour), int(minute), int(second))
    parsed = _timestamp(int(year), _MONTHS.index(month) + 1, int(day), int(hour), int(minute), int(second))
    if parsed is not None:
        if len(_recent_dates) >= 256:
            _recent_dates.clear()
        _recent_dates[text] = parsed
    return parsed


#: IMF-fixdates parsed lately (Date, Last-Modified and Expires repeat from answer to answer): their
#: parse took ~8 us of every origin answer; only this form is kept (the others depend on C{now})
_recent_dates: dict[str, float] = {}


def _year_of(timestamp: float) -> int:
    return time.gmtime(timestamp).tm_year


def _timestamp(year: int, month: int, day: int, hour: int, minute: int, second: int) -> Optional[float]:
    """The POSIX time of a calendar date and time; None if there is no such day (year 0000, 31 Feb)."""
    if not (year >= 1 and 1 <= day <= calendar.monthrange(year, month)[1] and hour < 24 and minute < 60
            and second <= 60):
        return None
    return float(calendar.timegm((year, month, day, hour, minute, min(second, 59), 0, 0, 0)))


def format_http_date(timestamp: float) -> str:
    """An IMF-fixdate for C{timestamp}."""
    t = time.gmtime(timestamp)
    days = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
    return (f"{days[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


_DELTA = re.compile(r"[0-9]+")


def parse_delta_seconds(value: Optional[str]) -> Optional[int]:
    """delta-seconds (RFC 9111 §1.2.2): digits only, capped at 2**31; None if not that."""
    if value is None or not _DELTA.fullmatch(value):
        return None
    if len(value) > 10:
        return DELTA_CAP
    return min(int(value), DELTA_CAP)


def parse_age(field_values: Sequence[str]) -> int:
    """The Age of an answer (RFC 9111 §5.1): its one delta-seconds value; 0 when absent or invalid."""
    items = _list_items(field_values)
    if len(items) != 1:
        return 0
    return parse_delta_seconds(items[0]) or 0


# -- cache directives (RFC 9111 §5.2, RFC 9213) -------------------------------------------------------


class _Invalid:
    """A directive whose value breaks its grammar, or that came twice with different values."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID = _Invalid()
DirectiveValue = Union[None, str, _Invalid]
Directives = dict[str, DirectiveValue]

_DIRECTIVE = re.compile(r'([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)(?:=(?:([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)|"((?:[^"\\]|\\.)*)"))?')


def parse_cache_control(field_values: Sequence[str]) -> Directives:
    """
    Cache-Control directives (RFC 9111 §5.2): names lower case, each with its argument (quoted
    strings unquoted) or None.  A directive given twice with different arguments, or whose element
    does not follow C{token [ "=" ( token / quoted-string ) ]}, is L{INVALID} (the freshness rules
    then take the answer as stale, §4.2.1); unparseable elements with no directive name are skipped.
    """
    directives: Directives = {}
    for item in _list_items(field_values):
        match = _DIRECTIVE.fullmatch(item)
        if match is None:
            name_match = _TOKEN.match(item)
            if name_match is not None:
                directives[name_match.group(0).lower()] = INVALID
            continue
        name, token, quoted = match.groups()
        name = name.lower()
        value: DirectiveValue = token if token is not None else (
            re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else None)
        if name in directives and directives[name] != value:
            value = INVALID
        directives[name] = value
    return directives


def parse_targeted(field_values: Sequence[str]) -> Optional[Directives]:
    """
    A targeted cache-control field such as CDN-Cache-Control (RFC 9213 §2): an RFC 8941 Dictionary
    whose members are cache directives.  Booleans become argument-less directives, integers,
    tokens and strings their text; None if the field is absent, empty or not a valid Dictionary
    (the cache then falls back to Cache-Control and Expires).
    """
    text = ",".join(field_values).strip(" \t")
    if not field_values or not text:
        return None
    try:
        members = _parse_sf_dictionary(text)
    except HeaderError:
        return None
    directives: Directives = {}
    for key, item in members:
        directives[key] = item
    return directives or None


_SF_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_SF_INTEGER = re.compile(r"-?[0-9]{1,15}")
_SF_DECIMAL = re.compile(r"-?[0-9]{1,12}\.[0-9]{1,3}")
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_SF_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_SF_BINARY = re.compile(r":[A-Za-z0-9+/=]*:")
_SF_BOOLEAN = re.compile(r"\?[01]")


def _parse_sf_dictionary(text: str) -> list[tuple[str, DirectiveValue]]:
    """RFC 8941 §4.2.2, members as (key, value) with the value mapped as L{parse_targeted} says."""
    members: list[tuple[str, DirectiveValue]] = []
    position = 0
    while True:
        match = _SF_KEY.match(text, position)
        if match is None:
            raise HeaderError("bad dictionary key")
        key, position = match.group(0), match.end()
        value: DirectiveValue = None
        if position < len(text) and text[position] == "=":
            if position + 1 < len(text) and text[position + 1] == "(":
                position = _skip_inner_list(text, position + 2)
                value = INVALID  # no cache directive takes a list
            else:
                value, position = _parse_bare_item(text, position + 1)
        position = _skip_parameters(text, position)
        members.append((key, value))
        position = _skip_ows(text, position)
        if position == len(text):
            return members
        if text[position] != ",":
            raise HeaderError("dictionary members must be separated by commas")
        position = _skip_ows(text, position + 1)
        if position == len(text):
            raise HeaderError("trailing comma")


def _skip_ows(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t":
        position += 1
    return position


def _parse_bare_item(text: str, position: int) -> tuple[DirectiveValue, int]:
    for pattern in (_SF_DECIMAL, _SF_INTEGER):
        match = pattern.match(text, position)
        if match is not None and not (match.end() < len(text) and text[match.end()] in "0123456789."):
            return match.group(0), match.end()
    match = _SF_STRING.match(text, position)
    if match is not None:
        return re.sub(r'\\(["\\])', r"\1", match.group(1)), match.end()
    match = _SF_BOOLEAN.match(text, position)
    if match is not None:
        return (None if match.group(0) == "?1" else INVALID), match.end()
    for pattern in (_SF_TOKEN, _SF_BINARY):
        match = pattern.match(text, position)
        if match is not None:
            return match.group(0), match.end()
    raise HeaderError("bad dictionary value")


def _skip_parameters(text: str, position: int) -> int:
    while position < len(text) and text[position] == ";":
        position = _skip_ows(text, position + 1)
        match = _SF_KEY.match(text, position)
        if match is None:
            raise HeaderError("bad parameter key")
        position = match.end()
        if position < len(text) and text[position] == "=":
            _, position = _parse_bare_item(text, position + 1)
    return position


def _skip_inner_list(text: str, position: int) -> int:
    while True:
        while position < len(text) and text[position] == " ":
            position += 1
        if position < len(text) and text[position] == ")":
            return _skip_parameters(text, position + 1)
        if position >= len(text):
            raise HeaderError("unterminated inner list")
        _, position = _parse_bare_item(text, position)
        position = _skip_parameters(text, position)
        if position < len(text) and text[position] not in " )":
            raise HeaderError("bad inner list")


def _delta(directives: Directives, name: str) -> Optional[int]:
    """A directive's delta-seconds argument; None if absent; -1 if present but invalid."""
    if name not in directives:
        return None
    value = directives[name]
    seconds = parse_delta_seconds(value) if isinstance(value, str) else None
    return -1 if seconds is None else seconds


# -- storing and freshness (RFC 9111 §3, §4.2, RFC 5861, RFC 9213) ----------------------------------

#: RFC 9110 §15.1: statuses a cache may store with heuristic freshness
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
#: statuses the edge stores (with explicit freshness for those not heuristically cacheable); 5xx
#: answers are relayed, never stored (deviation: a passing outage must not outlive itself)
UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | frozenset({302, 303, 307, 400, 401, 403, 451})
#: statuses stored with the operator's default lifetime when they carry neither freshness nor Last-Modified
DEFAULT_TTL_STATUSES = frozenset({200, 203, 206})
HEURISTIC_FRACTION = 0.1  # RFC 9111 §4.2.2: a typical setting is 10% of the time since Last-Modified


@frozen
class Policy:
    """
    What a shared cache may do with one answer.

    @ivar store: it may be kept (else it streams through to the viewer that asked and is dropped).
    @ivar why: why it may not be kept (for logs and the X-Cache reason); "" when it may.
    @ivar lifetime: seconds it is fresh for, counted from an age of 0 (see L{initial_age}).
    @ivar heuristic: the lifetime was guessed (no explicit freshness).
    @ivar stale_while_revalidate: seconds past its lifetime it may be served while one
        revalidation runs in the background (RFC 5861 §3).
    @ivar stale_if_error: seconds past its lifetime it may stand in when the origin fails
        (RFC 5861 §4); None: the edge's own setting.
    @ivar revalidate: it must never be served stale, not even when the origin fails
        (must-revalidate, proxy-revalidate, no-cache, or s-maxage without an explicit
        stale-while-revalidate / stale-if-error; RFC 9111 §4.2.4, §5.2.2).
    @ivar strip: names of fields kept out of the stored header block (Set-Cookie when stored).
    """

    store: bool
    why: str
    lifetime: float
    heuristic: bool = False
    stale_while_revalidate: float = 0.0
    stale_if_error: Optional[float] = None
    revalidate: bool = False
    strip: frozenset[str] = frozenset()


def cache_directives(fields: Fields) -> tuple[Directives, bool]:
    """
    The directives that govern the edge: CDN-Cache-Control when it is valid and not empty (RFC 9213
    §2.1: Cache-Control and Expires are then ignored), else Cache-Control; and whether they came
    from the targeted field.
    """
    targeted = parse_targeted(values(fields, "CDN-Cache-Control"))
    if targeted is not None:
        return targeted, True
    return parse_cache_control(values(fields, "Cache-Control")), False


def response_policy(
    status: int,
    fields: Fields,
    *,
    response_time: float,
    default_ttl: float,
    authorized: bool = False,
    request_no_store: bool = False,
    store_set_cookie: bool = False,
) -> Policy:
    """
    May a shared cache store this answer to a GET, and how fresh is it (RFC 9111 §3, §4.2)?

    @param status: the answer's status (a 206 the edge asked for counts as its object's 200).
    @param fields: the answer's header fields.
    @param response_time: when it arrived (the Date to count from when it has none).
    @param default_ttl: the heuristic lifetime's cap, and the lifetime of an answer with neither
        explicit freshness nor Last-Modified (an operator's override: RFC 9111 would revalidate it
        every time).
    @param authorized: the request carried Authorization (RFC 9111 §3.5).
    @param request_no_store: the request said no-store (RFC 9111 §5.2.1.5).
    @param store_set_cookie: store answers with Set-Cookie, without it (else they are not stored).
    """
    directives, targeted = cache_directives(fields)
    lifetime, kind = _lifetime(directives, targeted, fields, response_time, default_ttl)
    swr = _delta(directives, "stale-while-revalidate")
    sie = _delta(directives, "stale-if-error")
    revalidate = any(name in directives for name in ("must-revalidate", "proxy-revalidate", "no-cache")) or (
        "s-maxage" in directives and swr is None and sie is None)
    policy = Policy(
        store=True,
        why="",
        lifetime=lifetime,
        heuristic=kind != "explicit",
        stale_while_revalidate=float(max(swr or 0, 0)),
        stale_if_error=None if sie is None else float(max(sie, 0)),
        revalidate=revalidate,
    )
    why = _not_storable(status, directives, kind, fields, authorized, request_no_store, store_set_cookie)
    if why:
        return Policy(False, why, 0.0, revalidate=True)
    if values(fields, "Set-Cookie"):
        policy = attrs.evolve(policy, strip=frozenset({"set-cookie"}))
    return policy


def _not_storable(
    status: int,
    directives: Directives,
    kind: str,
    fields: Fields,
    authorized: bool,
    request_no_store: bool,
    store_set_cookie: bool,
) -> str:
    """Why RFC 9111 §3 (and the edge's own choices) forbid storing this answer; "" if nothing does."""
    if request_no_store:
        return "the request said no-store"
    understood = status in UNDERSTOOD_STATUSES
    if not understood:
        return f"status {status} is not stored"
    if "no-store" in directives and "must-understand" not in directives:
        return "no-store"
    if "private" in directives:
        return "private"
    if authorized and not any(name in directives for name in ("public", "s-maxage", "must-revalidate")):
        return "answer to a request with Authorization"
    vary = parse_vary(values(fields, "Vary"))
    if vary is None:
        return "Vary: *"
    if values(fields, "Set-Cookie") and not store_set_cookie:
        return "Set-Cookie"
    if kind != "explicit" and status not in HEURISTIC_STATUSES and "public" not in directives:
        return f"status {status} without explicit freshness"
    if kind == "default" and status not in DEFAULT_TTL_STATUSES:
        return f"status {status} without freshness information or Last-Modified"
    return ""


def _lifetime(
    directives: Directives, targeted: bool, fields: Fields, response_time: float, default_ttl: float
) -> tuple[float, str]:
    """
    C{(freshness lifetime, kind)} per RFC 9111 §4.2.1 for a shared cache; the kind is "explicit",
    "heuristic" (§4.2.2, from Last-Modified) or "default" (neither: C{default_ttl}).
    """
    if "no-cache" in directives:
        return 0.0, "explicit"
    for name in ("s-maxage", "max-age"):
        seconds = _delta(directives, name)
        if seconds is not None:
            return float(max(seconds, 0)), "explicit"  # invalid: stale (-1 -> 0)
    if not targeted:
        expires = values(fields, "Expires")
        if expires:
            if len(set(expires)) != 1:
                return 0.0, "explicit"  # several different Expires: stale
            expires_at = parse_http_date(expires[0], response_time)
            if expires_at is None:
                return 0.0, "explicit"  # RFC 9111 §5.3: an invalid Expires means already expired
            date = parse_http_date(last_value(fields, "Date"), response_time)
            return max(0.0, expires_at - (date if date is not None else response_time)), "explicit"
    last_modified = parse_http_date(last_value(fields, "Last-Modified"), response_time)
    if last_modified is None:
        return default_ttl, "default"
    date = parse_http_date(last_value(fields, "Date"), response_time)
    since = (date if date is not None else response_time) - last_modified
    return min(default_ttl, max(0.0, since * HEURISTIC_FRACTION)), "heuristic"


def initial_age(fields: Fields, request_time: float, response_time: float) -> float:
    """
    The corrected initial age of an answer (RFC 9111 §4.2.3): the larger of its apparent age (by its
    Date) and its Age plus the time the request took; the current age is this plus the time since
    C{response_time}.

    A Date has one-second resolution: the answer was made in the second after it, so the apparent
    age counted is the smallest the Date allows (RFC 9111 counts from the Date itself, which makes
    an answer up to a second older than it is: a max-age=1 answer could never be fresh).
    """
    date = parse_http_date(last_value(fields, "Date"), response_time)
    apparent = max(0.0, response_time - date - 1.0) if date is not None else 0.0
    corrected = parse_age(values(fields, "Age")) + max(0.0, response_time - request_time)
    return max(apparent, corrected)


# -- requests (RFC 9111 §5.2.1) --------------------------------------------------------------------


@frozen
class RequestDirectives:
    """What a viewer's request asks of the cache."""

    only_if_cached: bool = False
    no_store: bool = False
    no_cache: bool = False  # no-cache, max-age=0, or Pragma: no-cache without Cache-Control
    max_age: Optional[int] = None
    min_fresh: int = 0


def request_directives(fields: Fields) -> RequestDirectives:
    """The request's Cache-Control (RFC 9111 §5.2.1) and, without it, Pragma: no-cache (§5.4)."""
    cc_values = values(fields, "Cache-Control")
    if not cc_values:
        pragma = [item.lower() for item in _list_items(values(fields, "Pragma"))]
        return RequestDirectives(no_cache="no-cache" in pragma)
    directives = parse_cache_control(cc_values)
    max_age = _delta(directives, "max-age")
    min_fresh = _delta(directives, "min-fresh")
    return RequestDirectives(
        only_if_cached="only-if-cached" in directives,
        no_store="no-store" in directives,
        no_cache="no-cache" in directives or max_age == 0,
        max_age=None if max_age is None or max_age < 0 else max_age,
        min_fresh=max(min_fresh or 0, 0),
    )


# -- Vary (RFC 9111 §4.1) --------------------------------------------------------------------------

_CASELESS = frozenset({"accept-encoding", "accept-language", "accept-charset"})


def parse_vary(field_values: Sequence[str]) -> Optional[tuple[str, ...]]:
    """
    The field names an answer varies on, lower case, sorted, once each; None for C{Vary: *} (which
    never matches a later request).  Elements that are not field names are ignored.
    """
    names: set[str] = set()
    for item in _list_items(field_values):
        if item == "*":
            return None
        if _TOKEN.fullmatch(item):
            names.add(item.lower())
    return tuple(sorted(names))


def secondary_key(vary: Sequence[str], request_fields: Fields) -> str:
    """
    What a request's fields named by C{vary} come to after normalisation (RFC 9111 §4.1): field lines
    combined, list elements trimmed, case folded where the field's values are case-insensitive; an
    absent field differs from an empty one.
    """
    parts: list[Optional[str]] = []
    for name in vary:
        found = values(request_fields, name)
        if not found:
            parts.append(None)
            continue
        items = _list_items(found)
        if name in _CASELESS:
            items = [item.lower() for item in items]
        parts.append(",".join(items))
    return json.dumps([list(vary), parts], separators=(",", ":"))


def variant_key(primary: str, generation: str, secondary: str) -> str:
    """The cache key of one variant of C{primary}: the one rule for keys of Vary'd answers."""
    return f"{derived_prefix(primary)}vary\x00{generation}\x00{secondary}"


def bypass_key(primary: str, nonce: str) -> str:
    """The key of an answer to C{primary} that is kept nowhere (not storable): it replaces nothing."""
    return f"{derived_prefix(primary)}bypass\x00{nonce}"


def derived_prefix(primary: str) -> str:
    """
    The start of every key made from C{primary} (L{variant_key}, L{bypass_key}), and of no other
    key: a request's key never holds NUL (its path and query are percent-encoded).
    """
    return primary + "\x00"


# -- entity tags (RFC 9110 §8.8.3, §13.1.2) ----------------------------------------------------------

_ETAG_LIST_ITEM = re.compile(r'[ \t]*((?:W/)?"[\x21\x23-\x7e\x80-\xff]*")?[ \t]*(?:,|$)')


def parse_etag_list(value: str) -> Union[str, list[str]]:
    """
    An If-None-Match / If-Match value (RFC 9110 §13.1): C{"*"} or the entity-tags listed, each as
    sent (C{W/"..."} or C{"..."}); commas inside an entity-tag's quotes are part of it.

    @raise HeaderError: anything else.
    """
    text = value.strip(" \t")
    if text == "*":
        return "*"
    tags: list[str] = []
    position = 0
    while position < len(text):
        match = _ETAG_LIST_ITEM.match(text, position)
        if match is None or match.end() == position:
            raise HeaderError(f"bad entity-tag list {value[:60]!r}")
        if match.group(1):
            tags.append(match.group(1))
        position = match.end()
    if not tags:
        raise HeaderError("an empty entity-tag list")
    return tags


def weak_match(a: str, b: str) -> bool:
    """RFC 9110 §8.8.3.2: equal opaque tags, either or both weak."""
    return a.removeprefix("W/") == b.removeprefix("W/")


# -- header blocks (RFC 9110 §7.6.1, RFC 9111 §3.1, §3.2) -------------------------------------------

#: RFC 9110 §7.6.1 hop-by-hop fields, and Proxy-* fields meant for the next hop only
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "proxy-authentication-info", "te", "trailer", "transfer-encoding", "upgrade",
})
#: fields the edge writes itself on every answer, never replayed from the origin's block
EDGE_FIELDS = frozenset({"content-length", "content-range", "accept-ranges", "age", "x-cache", "x-served-by"})
#: fields kept apart from the block, in the object's metadata (they identify and type the stored bytes,
#: and a 304 never changes them: the edge keeps serving the bytes it has)
META_FIELDS = frozenset({"etag", "last-modified", "content-type"})


def hop_by_hop(fields: Fields) -> frozenset[str]:
    """The names of C{fields} that are hop-by-hop: the fixed ones and those Connection lists."""
    listed = {item.lower() for item in _list_items(values(fields, "Connection")) if _TOKEN.fullmatch(item)}
    return HOP_BY_HOP | listed


def stored_fields(fields: Fields, *, strip: frozenset[str] = frozenset(), date: Optional[str] = None) -> Fields:
    """
    The header block kept with an answer and replayed with it: its fields minus hop-by-hop ones,
    minus those the edge writes itself (framing, Age, X-Cache), those kept in the metadata
    (L{META_FIELDS}) and those in C{strip}; CR, LF and NUL in values become spaces (RFC 9110 §5.5);
    with a Date
    (C{date}, the time it arrived) added when the origin sent none (RFC 9110 §6.6.1).

    @raise HeaderError: the block is over L{MAX_HEADER_BLOCK} bytes.
    """
    dropped = hop_by_hop(fields) | EDGE_FIELDS | META_FIELDS | strip
    kept = tuple((name, _CTL.sub(" ", value)) for name, value in fields
                 if name.lower() not in dropped and _TOKEN.fullmatch(name))
    if date is not None and not values(kept, "Date"):
        kept += (("Date", date),)
    size = sum(len(name) + len(value) + 4 for name, value in kept)
    if size > MAX_HEADER_BLOCK:
        raise HeaderError(f"the origin's header block is {size} bytes, over the {MAX_HEADER_BLOCK}-byte cap")
    return kept


def updated_fields(stored: Fields, fresh: Fields, *, strip: frozenset[str] = frozenset()) -> Fields:
    """
    The stored block after a 304 (RFC 9111 §3.2): each field the 304 carries replaces every stored
    line of that name, except the hop-by-hop and edge fields, those in C{strip}, and those kept in
    the metadata (ETag, Last-Modified, Content-Type: the edge keeps serving the bytes it has).

    @raise HeaderError: the block is over L{MAX_HEADER_BLOCK} bytes.
    """
    incoming = stored_fields(fresh, strip=strip)
    replaced = {name.lower() for name, _ in incoming}
    kept = tuple((name, value) for name, value in stored if name.lower() not in replaced)
    return stored_fields(kept + incoming)


#: RFC 9110 §15.4.5: what a 304 carries of the answer a 200 would have had
NOT_MODIFIED_FIELDS = frozenset({"cache-control", "content-location", "date", "etag", "expires", "vary",
                                 "last-modified", "cdn-cache-control"})


def not_modified_fields(stored: Fields) -> Fields:
    return tuple((name, value) for name, value in stored if name.lower() in NOT_MODIFIED_FIELDS)


#: fields whose value describes the bytes of one whole answer: wrong for a cut or rewritten body
CONTENT_DIGESTS = frozenset({"content-md5", "content-digest", "digest"})
REPRESENTATION_DIGESTS = frozenset({"repr-digest"})


# -- requests to the origin (RFC 9110 §7.6) -----------------------------------------------------------

#: request fields the edge sets itself when it asks the origin (a fill needs its own Range/If-*)
EDGE_REQUEST_FIELDS = frozenset({
    "host", "range", "if-range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since",
    "accept-encoding", "content-length", "expect", "x-forwarded-for", "via",
})


def forwarded_request_fields(fields: Fields, client: Optional[str], via: Optional[str]) -> Fields:
    """
    The viewer's request fields the edge forwards to the origin on its behalf: the end-to-end ones
    (not hop-by-hop, not those the fill sets itself: Host, Range, conditionals, Accept-Encoding),
    X-Forwarded-For with the viewer's address appended, and Via with this edge (C{via}, e.g.
    C{1.1 edge-7}; None: the viewer's Via as it came) appended (RFC 9110 §7.6.3).
    """
    listed: set[str] = set()
    forwarded_for: list[str] = []
    vias: list[str] = []
    kept: list[tuple[str, str]] = []
    for name, value in fields:  # one pass: this runs for every request, hits included
        lower = name.lower()
        if lower == "connection":
            listed.update(item.lower() for item in _list_items((value,)))
        elif lower == "x-forwarded-for":
            forwarded_for.append(value)
        elif lower == "via":
            vias.append(value)
        if lower not in HOP_BY_HOP and lower not in EDGE_REQUEST_FIELDS:
            kept.append((name, value))
    if listed:
        kept = [(name, value) for name, value in kept if name.lower() not in listed]
    if client is not None:
        forwarded_for.append(client)
    if forwarded_for:
        kept.append(("X-Forwarded-For", ", ".join(forwarded_for)))
    if via is not None:
        vias.append(via)
    if vias:
        kept.append(("Via", ", ".join(vias)))
    return tuple(kept)
