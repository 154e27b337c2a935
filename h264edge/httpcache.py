# -*- test-case-name: tests.test_httpcache -*-
"""
The edge as an HTTP cache: pure rules over header values (RFC 9110, 9111, 9213, 5861).

No Twisted and no I/O here: header values (text, as latin-1 decoded from the wire) in, values or
L{HeaderError} out.  Every parser takes untrusted text from origins and viewers: numbers are ASCII
digit runs with length caps, never C{int()} of whatever came.
"""

from __future__ import annotations

import re
from typing import Optional

from attrs import frozen

MAX_DIGITS = 18  # any count of bytes or seconds the edge takes from a header: below 10**18


class HeaderError(ValueError):
    """A header value that does not follow its grammar."""


# -- framing of partial answers (RFC 9110 §8.6, §14.4) ---------------------------------------------

_DIGITS = rf"[0-9]{{1,{MAX_DIGITS}}}"
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
