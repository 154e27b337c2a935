# -*- test-case-name: tests.test_http_rules -*-
"""
The pure HTTP rules of the edge: safe paths and cache keys, seek parameters, Range and conditionals.

No Twisted here: strings in, values or L{BadRequest} out, so every rule is tested without a reactor.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlencode

from attrs import frozen

from h264edge.errors import EdgeError
from h264edge.httpcache import HeaderError, parse_etag_list, parse_http_date, weak_match

SEEK_PARAMETERS = frozenset({"start", "end"})
MP4_EXTENSIONS = (".mp4", ".m4v", ".mov", ".m4a", ".3gp")
FLV_EXTENSIONS = (".flv",)


class BadRequest(EdgeError):
    """The request itself is wrong: answered 400 with this message."""


@frozen
class Target:
    """What a request names: the origin path, the cache key, and the pseudo-streaming parameters."""

    path: str  # normalised, percent-encoded, starts with "/"; sent to the origin
    key: str  # path + the query string without start/end (or without any query)
    origin_query: str  # the query string sent to the origin (without start/end)
    start: Optional[str]
    end: Optional[str]

    @property
    def kind(self) -> str:
        lower = self.path.lower()
        if lower.endswith(MP4_EXTENSIONS):
            return "mp4"
        if lower.endswith(FLV_EXTENSIONS):
            return "flv"
        return "other"


_SAFE_PATH_CHARS = "/!$&'()*+,;=:@-._~"


def parse_target(raw_path: bytes, raw_query: bytes, keep_query: bool = True) -> Target:
    """
    Normalise a request path so it can never escape the origin's root.

    Percent-decoding happens once; C{.} and C{..} segments, NUL and other control bytes, backslashes and
    invalid UTF-8 are refused (a cache must not guess what an origin would make of them).  On MP4 and
    FLV paths, C{start} and C{end} are the pseudo-streaming parameters: kept out of the key and of the
    origin's query.  On other paths they are ordinary parameters.
    """
    if not raw_path.startswith(b"/"):
        raise BadRequest("the path must start with /")
    decoded = unquote_to_bytes(raw_path)
    if any(b < 0x20 or b == 0x7F for b in decoded) or b"\\" in decoded:
        raise BadRequest("the path holds control characters or backslashes")
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the path is not UTF-8") from None
    segments = text.split("/")[1:]
    for segment in segments:
        if segment in (".", ".."):
            raise BadRequest("the path holds . or .. segments")
    if not segments or segments[-1] == "":
        raise BadRequest("the path names a directory, not a file")
    path = "/" + "/".join(quote(segment, safe=_SAFE_PATH_CHARS.replace("/", "")) for segment in segments)
    try:
        pairs = parse_qsl(raw_query.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise BadRequest("the query string is not UTF-8") from None
    seekable = path.lower().endswith(MP4_EXTENSIONS + FLV_EXTENSIONS)
    start = end = None
    rest: list[tuple[str, str]] = []
    for name, value in pairs:
        if seekable and name == "start":
            start = value
        elif seekable and name == "end":
            end = value
        else:
            rest.append((name, value))
    origin_query = urlencode(rest) if rest else ""
    key = path + ("?" + origin_query if origin_query and keep_query else "")
    return Target(path, key, origin_query, start, end)


def parse_seconds(name: str, value: Optional[str]) -> Optional[float]:
    """A C{start}/C{end} value in decimal seconds (as nginx's mp4 module takes them)."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise BadRequest(f"{name}={value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise BadRequest(f"{name}={value!r} must be a finite number of seconds >= 0")
    return seconds


def parse_seek(start: Optional[str], end: Optional[str]) -> tuple[float, Optional[float]]:
    """C{(start, end)} in seconds; C{(0.0, None)} means the whole file."""
    start_s = parse_seconds("start", start) or 0.0
    end_s = parse_seconds("end", end)
    if end_s is not None and end_s <= start_s:
        raise BadRequest(f"end={end} must be greater than start={start or 0}")
    return start_s, end_s


def parse_byte_offset(value: Optional[str]) -> int:
    """An FLV C{start} in bytes."""
    if value is None or value == "":
        return 0
    if not value.isdigit() or len(value) > 19:
        raise BadRequest(f"start={value!r} is not a byte offset")
    return int(value)


# -- Range ----------------------------------------------------------------------------------------

_RANGE = re.compile(r"^\s*bytes\s*=\s*(.+)$", re.IGNORECASE)
_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


class Unsatisfiable(EdgeError):
    """A Range that does not overlap the representation: 416."""


def _range_spec(value: Optional[str]) -> Optional[tuple[Optional[int], Optional[int]]]:
    """
    The one C{bytes=} range in a Range value as C{(first, last)}: C{(None, N)} for a suffix of N bytes,
    C{(F, None)} for "from F on".  None for no Range, a syntax we ignore as RFC 9110 allows, several
    ranges (answered with 200), or C{last < first}.
    """
    if value is None:
        return None
    match = _RANGE.match(value)
    if match is None:
        return None
    specs = match.group(1).split(",")
    if len(specs) != 1:
        return None
    spec = _SPEC.match(specs[0])
    if spec is None:
        return None
    first_s, last_s = spec.groups()
    if first_s == "" and last_s == "":
        return None
    first = int(first_s) if first_s else None
    last = int(last_s) if last_s else None
    if first is not None and last is not None and last < first:
        return None
    return first, last


def parse_range(value: Optional[str], length: int) -> Optional[tuple[int, int]]:
    """
    The single byte range C{(first, last)} asked for, clamped to a representation of C{length} bytes,
    or None to answer the whole representation.

    @raise Unsatisfiable: a well-formed range that lies wholly past the end.
    """
    spec = _range_spec(value)
    if spec is None:
        return None
    first, last = spec
    if first is None:
        assert last is not None
        if last == 0:
            raise Unsatisfiable("an empty suffix range")
        if length == 0:
            raise Unsatisfiable("the representation is empty")
        return max(0, length - last), length - 1
    if first >= length:
        raise Unsatisfiable(f"byte {first} is past the end ({length} bytes)")
    return first, length - 1 if last is None else min(last, length - 1)


def range_hint(value: Optional[str]) -> Optional[tuple[int, Optional[int]]]:
    """
    Where a Range request starts, to fetch those slices first on a miss (the size is not known yet):
    C{(first, last or None)}, or C{(-N, None)} for a suffix range (the last N bytes).
    """
    spec = _range_spec(value)
    if spec is None:
        return None
    first, last = spec
    if first is None:
        return (-last, None) if last else None
    return first, last


# -- conditionals -------------------------------------------------------------------------------


def not_modified(
    if_none_match: Optional[str],
    if_modified_since: Optional[str],
    etag: Optional[str],
    last_modified: Optional[str],
) -> bool:
    """Whether a GET/HEAD with these conditionals gets 304 (RFC 9110 §13.2.2 order)."""
    if if_none_match is not None:
        if etag is None:
            return False
        try:
            tags = parse_etag_list(if_none_match)  # commas inside an entity-tag's quotes are its own
        except HeaderError:
            return False  # not a list of entity-tags: it matches nothing
        return tags == "*" or any(weak_match(tag, etag) for tag in tags)
    if if_modified_since is not None and last_modified is not None:
        since = parse_http_date(if_modified_since)
        modified = parse_http_date(last_modified)
        return since is not None and modified is not None and modified <= since
    return False


def range_applies(if_range: Optional[str], etag: Optional[str], last_modified: Optional[str]) -> bool:
    """If-Range: the Range is honoured only if the validator matches exactly (strong comparison)."""
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith(('"', "W/")):
        return etag is not None and not value.startswith("W/") and not etag.startswith("W/") and value == etag
    return last_modified is not None and value == last_modified


def allowed_methods(pass_methods: Sequence[str]) -> str:
    return ", ".join(["GET", "HEAD", *pass_methods])
