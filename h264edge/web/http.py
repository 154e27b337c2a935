# -*- test-case-name: tests.test_http_rules -*-
"""
The pure HTTP rules of the edge: safe paths and cache keys, seek parameters, Range and conditionals.

No Twisted here: strings in, values or L{BadRequest} out, so every rule is tested without a reactor.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import re
from typing import Optional, Sequence
from urllib.parse import quote, unquote_to_bytes

from attrs import define, frozen

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
    origin_query: str  # the query string sent to the origin (without start/end), as sent (see parse_target)
    start: Optional[str]  # start= and end= percent-decoded, each byte one character (latin-1)
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

#: query bytes an origin request carries as they are: printable ASCII less what a URL may not hold
#: raw (treq's URL handling would percent-encode those itself) and "#" (it would start a fragment)
_QUERY_RAW = frozenset(range(0x21, 0x7F)) - frozenset(b'"#<>[\\]^`{|}')
_QUERY_PLAIN = re.compile(rb'[!$%&\'()*+,\-./0-9:;=?@A-Z_a-z~]*')
_QUERY_ESCAPES = {byte: (chr(byte) if byte in _QUERY_RAW else f"%{byte:02X}") for byte in range(256)}
_SEEK_NAMES = {b"start": "start", b"end": "end"}


def _query_text(raw_query: bytes) -> str:
    """
    C{raw_query} as text an origin request carries unchanged: its bytes as sent, except those a
    request target cannot hold (controls, space, non-ASCII, and a few ASCII signs), which become
    C{%XX}.  Existing percent escapes, C{+}, the order and the separators are kept byte for byte.
    """
    if _QUERY_PLAIN.fullmatch(raw_query):
        return raw_query.decode("ascii")
    return "".join(_QUERY_ESCAPES[byte] for byte in raw_query)


def _form_decode(text: str) -> bytes:
    """A query name or value as application/x-www-form-urlencoded means it (C{+} is a space)."""
    return unquote_to_bytes(text.replace("+", " "))


def parse_target(raw_path: bytes, raw_query: bytes, keep_query: bool = True) -> Target:
    """
    Normalise a request path so it can never escape the origin's root, and split off the
    pseudo-streaming parameters of its query.

    Percent-decoding of the path happens once; C{.} and C{..} segments, NUL and other control bytes,
    backslashes and invalid UTF-8 are refused (a cache must not guess what an origin would make of
    them).  The query string is kept as sent, in the key and towards the origin (L{_query_text}):
    C{?sig=%ff}, C{?sig=%fe} and C{?sig=%EF%BF%BD} are three objects.  On MP4 and FLV paths, the
    C{start} and C{end} parameters (named so after percent-decoding) are the pseudo-streaming
    parameters: taken out of the key and of the origin's query, the other parameters left as they
    were.  On other paths they are ordinary parameters.
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
    path = _quoted_path(segments)
    query = _query_text(raw_query)
    seekable = path.lower().endswith(MP4_EXTENSIONS + FLV_EXTENSIONS)
    found: dict[str, str] = {}
    if seekable and query:
        kept = []
        for piece in query.split("&"):
            name, _, value = piece.partition("=")
            seek_name = _SEEK_NAMES.get(_form_decode(name)) if len(name) <= 15 else None
            if seek_name is None:
                kept.append(piece)
            else:
                found[seek_name] = _form_decode(value).decode("latin-1")  # the last one counts
        if found:
            query = "&".join(kept)
    key = path + ("?" + query if query and keep_query else "")
    return Target(path, key, query, found.get("start"), found.get("end"))


def _quoted_path(segments: Sequence[str]) -> str:
    """Decoded path segments as a key's and an origin request's path: each percent-encoded the one way."""
    return "/" + "/".join(quote(segment, safe=_SAFE_PATH_CHARS.replace("/", "")) for segment in segments)


def parse_key_prefix(prefix: str) -> str:
    """
    A purge prefix (text: C{/videos/2024/}, C{/vidéos/} or C{/vid%C3%A9os/}) as the start of the cache
    keys under it: its path percent-encoded as L{parse_target} encodes paths, a query part as sent.

    @raise BadRequest: it does not start with C{/}, or its path is not UTF-8 once decoded.
    """
    if not prefix.startswith("/"):
        raise BadRequest("a purge prefix starts with /")
    path, mark, query = prefix.partition("?")
    try:
        text = unquote_to_bytes(path.encode("utf-8")).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the prefix is not UTF-8") from None
    return _quoted_path(text.split("/")[1:]) + mark + _query_text(query.encode("utf-8"))


def excerpt(value: str | bytes, limit: int = 40) -> str:
    """
    Client text for an error body or a log line: at most C{limit} characters of it, quoted, with
    anything but printable ASCII (and the backslash and quote) written as C{\\xNN}, and C{...} when
    it was cut.
    """
    if isinstance(value, str):
        raw = value.encode("latin-1") if value.isascii() or max(value) <= "\xff" else value.encode("utf-8", "replace")
    else:
        raw = value
    shown = "".join(chr(b) if 0x20 <= b < 0x7F and b not in (0x5C, 0x22) else f"\\x{b:02x}" for b in raw[:limit])
    return '"' + shown + ('"...' if len(raw) > limit else '"')


_SECONDS = re.compile(r"(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][-+]?[0-9]{1,3})?")


def parse_seconds(name: str, value: Optional[str]) -> Optional[float]:
    """
    A C{start}/C{end} value in decimal seconds: ASCII digits with an optional fraction and an optional
    exponent (C{12}, C{12.5}, C{.5}, C{1e300}: what players write numbers as); no sign, spaces,
    other digits, C{inf} or C{nan}, at most 20 digits before and after the point.
    """
    if value is None or value == "":
        return None
    if not _SECONDS.fullmatch(value):
        raise BadRequest(f"{name}={excerpt(value)} is not a number of seconds")
    seconds = float(value)
    if not math.isfinite(seconds):
        raise BadRequest(f"{name}={excerpt(value)} must be a finite number of seconds")
    return seconds


def parse_seek(start: Optional[str], end: Optional[str]) -> tuple[float, Optional[float]]:
    """C{(start, end)} in seconds; C{(0.0, None)} means the whole file."""
    start_s = parse_seconds("start", start) or 0.0
    end_s = parse_seconds("end", end)
    if end_s is not None and end_s <= start_s:
        raise BadRequest(f"end={excerpt(end or '')} must be greater than start={excerpt(start or '0')}")
    return start_s, end_s


_BYTE_OFFSET = re.compile(r"[0-9]{1,19}")


def parse_byte_offset(value: Optional[str]) -> int:
    """An FLV C{start} in bytes: 1 to 19 ASCII digits."""
    if value is None or value == "":
        return 0
    if not _BYTE_OFFSET.fullmatch(value):
        raise BadRequest(f"start={excerpt(value)} is not a byte offset")
    return int(value)


# -- Range ----------------------------------------------------------------------------------------

_RANGE = re.compile(r"[ \t]*bytes[ \t]*=(.*)", re.IGNORECASE | re.DOTALL)
_SPEC = re.compile(r"[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*")
HUGE = 10**18
"""Stands for any byte position of 19 or more digits: past the end of every representation."""


class Unsatisfiable(EdgeError):
    """A Range that does not overlap the representation: 416."""


def _position(digits: str) -> int:
    """ASCII digits as a byte position; more than 18 significant digits is L{HUGE}."""
    significant = digits.lstrip("0")
    return HUGE if len(significant) > 18 else int(significant or "0")


def _range_spec(value: Optional[str]) -> Optional[tuple[Optional[int], Optional[int]]]:
    """
    The one C{bytes=} range in a Range value as C{(first, last)}: C{(None, N)} for a suffix of N bytes,
    C{(F, None)} for "from F on".  None for no Range, a syntax we ignore as RFC 9110 allows, several
    ranges (answered with 200), or C{last < first}.  Positions are ASCII digits; one too long to be
    a position in any object stands for L{HUGE}.
    """
    if value is None:
        return None
    match = _RANGE.fullmatch(value)
    if match is None:
        return None
    specs = match.group(1)
    if "," in specs:
        return None
    spec = _SPEC.fullmatch(specs)
    if spec is None:
        return None
    first_s, last_s = spec.groups()
    if first_s == "" and last_s == "":
        return None
    first = _position(first_s) if first_s else None
    last = _position(last_s) if last_s else None
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
        raise Unsatisfiable(f"the range starts past the end ({length} bytes)")
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
    if first >= HUGE:
        return None  # past the end of anything: the answer is a 416, learnt from the object's start
    return first, last


# -- conditionals -------------------------------------------------------------------------------


def parse_request_date(value: str) -> Optional[float]:
    """
    An HTTP-date from a request (If-Modified-Since) as POSIX seconds, or None if it is not one: the
    three forms of RFC 9110 §5.6.7 as L{parse_http_date} reads every HTTP-date, at most 40 characters.
    """
    value = value.strip(" \t")
    return parse_http_date(value) if len(value) <= 40 else None


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
        since = parse_request_date(if_modified_since)
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


# -- clients behind proxies ------------------------------------------------------------------------

_MAX_FORWARDED_HOPS = 32


def parse_networks(values: Sequence[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """C{--trusted-proxy} values (addresses or CIDR networks) as networks; ValueError names a bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network") from None
    return tuple(networks)


def list_field(lines: Optional[Sequence[bytes]]) -> Optional[str]:
    """
    A list field's lines as one value (RFC 9110 §5.3: joined with ", "), None without any.  For
    X-Forwarded-For: a proxy may add a line of its own (HAProxy's C{option forwardfor} does) rather
    than append to the one it got, and only the whole list says who is right-most.
    """
    if not lines:
        return None
    return ", ".join(line.decode("latin-1") for line in lines)


def _address(text: str) -> Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    if not text or len(text) > 45:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def forwarded_client(
    peer: str,
    forwarded_for: Optional[str],
    trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> Optional[str]:
    """
    The client's address: C{peer}, unless C{peer} is a trusted proxy; then the right-most address
    of its C{X-Forwarded-For} that is not a trusted proxy (each proxy appends the address it got
    the request from, so only the part right of the last untrusted hop is true).  None when that
    address cannot be known (a trusted proxy sent a malformed or empty list): never a guess that
    might be a trusted or loopback address.
    """
    if not trusted or not _is_in(_address(peer), trusted):
        return peer
    if forwarded_for is None:
        return peer  # the proxy talks for itself
    hops = forwarded_for.split(",")
    if len(hops) > _MAX_FORWARDED_HOPS:
        hops = hops[-_MAX_FORWARDED_HOPS:]
    client = None
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            return None
        client = str(address)
        if not _is_in(address, trusted):
            return client
    return client


def _is_in(
    address: Optional[ipaddress.IPv4Address | ipaddress.IPv6Address],
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> bool:
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == network.version and address in network for network in networks)


def trusted_peer(peer: str, trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether the address C{peer} is in one of the C{trusted} networks."""
    return _is_in(_address(peer), trusted)


def is_loopback(address: Optional[str]) -> bool:
    """Whether C{address} is a loopback address (127.0.0.0/8, ::1, or v4-mapped loopback)."""
    parsed = _address(address) if address else None
    if parsed is None:
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return parsed.is_loopback


# -- who may purge ---------------------------------------------------------------------------------

_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]{1,4096}=*) *", re.IGNORECASE)
TOKEN_CHARS = re.compile(r"[A-Za-z0-9\-._~+/]{1,4096}=*")


def bearer_token(authorization: Optional[str]) -> Optional[str]:
    """The token of an C{Authorization: Bearer TOKEN} value (RFC 6750 b64token), None for anything else."""
    if authorization is None:
        return None
    match = _BEARER.fullmatch(authorization)
    return match.group(1) if match else None


@define
class PurgeAuth:
    """
    Who may purge.  With a C{token}, every purge needs C{Authorization: Bearer TOKEN} (401 without,
    403 with another); purges on the viewer listener also need a loopback client, and so do admin
    purges while no token is set.  The client is the peer, or, when the peer is one of the
    C{trusted_proxies}, the address its X-Forwarded-For names (L{forwarded_client}).
    """

    token: Optional[str] = None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def refusal(
        self, peer: str, forwarded_for: Optional[str], authorization: Optional[str], viewer_listener: bool
    ) -> Optional[tuple[int, str]]:
        """None if the purge may go on, else the status and message that refuse it."""
        if self.token is not None:
            given = bearer_token(authorization)
            if given is None:
                return 401, "purging needs Authorization: Bearer TOKEN"
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return 403, "wrong token"
        if viewer_listener or self.token is None:
            client = forwarded_client(peer, forwarded_for, self.trusted_proxies)
            if not is_loopback(client):
                where = "on the viewer port" if viewer_listener else "without --admin-token"
                return 403, f"purging {where} is accepted from loopback clients only"
        return None
