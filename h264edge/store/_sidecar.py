# -*- test-case-name: tests.test_store,tests.test_sidecar -*-
"""
Object metadata and its on-disk sidecar: encoding, and paranoid decoding.

Pure code (no file access): the store hands in the sidecar's bytes and gets back a L{Sidecar} or a
L{BadSidecar}.  Anything a hostile or half-written sidecar could contain must end in L{BadSidecar},
never in another exception and never in an entry that could make the edge serve wrong bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from attrs import frozen

SIDECAR_VERSION = 2
"""
Version 2 adds the answer's status and header block and its cache policy (age, stale windows,
Vary).  A version 1 sidecar is still read: its object is a 200 whose stored fields are the ones it
kept (Content-Type, ETag, Last-Modified), aged 0 at its fetch, without stale windows or Vary.
"""

# Limits that keep a hostile sidecar from costing memory or time; far above anything real
# (a 256 TiB object in 1 MiB slices needs a 32 MiB bitmap, so sidecars stay well under the cap
# for any object a video edge will ever hold).
MAX_OBJECT_SIZE = 1 << 48
MAX_SIDECAR_BYTES = 1 << 20
MAX_TIMESTAMP = 1e11  # year 5138: file times beyond this overflow some platforms
MAX_FIELDS = 1000  # stored header fields (the block itself is capped where it is made)

_TOKEN = re.compile(r"\A[0-9a-f]{16}\Z")
_FIELD_NAME = re.compile(r"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_FIELD_VALUE = re.compile(r"\A[^\x00\r\n\u0100-\U0010ffff]*\Z")  # latin-1 (an answer's head), one line
_META_VALUE = re.compile(r"\A[^\r\n\u0100-\U0010ffff]*\Z")  # Content-Type, ETag, Last-Modified
_GENERATION = re.compile(r"\A(?:[0-9a-f]{16})?\Z")

Fields = tuple[tuple[str, str], ...]


@frozen
class ObjectMeta:
    """
    What the origin told us about one object, keyed by cache key: its status, validators, type and
    header block, and how long it is fresh.

    @ivar headers: the stored header fields replayed with every answer (see
        L{h264edge.httpcache.stored_fields}); Content-Type, ETag and Last-Modified are kept apart.
    @ivar fetched_at: when its answer arrived (or was last revalidated).
    @ivar expires_at: when it stops being fresh (its lifetime less its initial age, from fetched_at).
    @ivar age: its corrected initial age at C{fetched_at} (RFC 9111 §4.2.3).
    @ivar stale_while_revalidate: seconds past C{expires_at} it may be served while revalidating.
    @ivar stale_if_error: seconds past C{expires_at} it may stand in for a failing origin (None: the
        edge's setting).
    @ivar revalidate: never served stale (must-revalidate and the like).
    @ivar vary: the request fields that select it (a variant, and its Vary marker).
    @ivar variants: set on a Vary marker (an empty object at the primary key that only records
        C{vary}): the generation in its variants' keys.  Empty for an answer.
    """

    key: str
    size: int
    etag: str | None
    last_modified: str | None
    content_type: str
    fetched_at: float
    expires_at: float
    status: int = 200
    headers: Fields = ()
    age: float = 0.0
    stale_while_revalidate: float = 0.0
    stale_if_error: float | None = None
    revalidate: bool = False
    vary: tuple[str, ...] = ()
    variants: str = ""

    def same_representation(self, other: ObjectMeta) -> bool:
        """True if C{other} describes the same bytes: status, size, ETag and Last-Modified all equal."""
        return (
            self.size == other.size
            and self.etag == other.etag
            and self.last_modified == other.last_modified
            and self.status == other.status
        )

    def is_fresh(self, now: float) -> bool:
        return now < self.expires_at

    def current_age(self, now: float) -> float:
        """RFC 9111 §4.2.3: its initial age plus the time it has been stored."""
        return self.age + max(0.0, now - self.fetched_at)


class BadSidecar(Exception):
    """A sidecar that cannot be trusted; the entry it describes must be discarded."""


@frozen
class Sidecar:
    """A decoded, validated sidecar: the metadata plus which slices of data file C{token} are synced."""

    meta: ObjectMeta
    token: str
    present: bytes
    last_used: float


def key_hash(key: str) -> str:
    """The hex SHA-256 naming an object's files; keys may hold any code point, even lone surrogates."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def slice_count(size: int, slice_size: int) -> int:
    return -(-size // slice_size)


def bitmap_length(size: int, slice_size: int) -> int:
    return (slice_count(size, slice_size) + 7) // 8


def encode_sidecar(
    meta: ObjectMeta, slice_size: int, token: str, present: bytes | bytearray, last_used: float
) -> bytes:
    record = {
        "version": SIDECAR_VERSION,
        "key": meta.key,
        "size": meta.size,
        "etag": meta.etag,
        "last_modified": meta.last_modified,
        "content_type": meta.content_type,
        "fetched_at": meta.fetched_at,
        "expires_at": meta.expires_at,
        "status": meta.status,
        "headers": [list(field) for field in meta.headers],
        "age": meta.age,
        "swr": meta.stale_while_revalidate,
        "sie": meta.stale_if_error,
        "revalidate": meta.revalidate,
        "vary": list(meta.vary),
        "variants": meta.variants,
        "slice_size": slice_size,
        "data": token,
        "present": present.hex(),
        "last_used": last_used,
    }
    return json.dumps(record, separators=(",", ":")).encode("ascii")


def _int(record: dict[str, Any], name: str) -> int:
    value = record.get(name)
    if type(value) is not int:
        raise BadSidecar(f"{name} is not an integer")
    return value


def _number(record: dict[str, Any], name: str) -> float:
    value = record.get(name)
    if type(value) is int and abs(value) < 1 << 62:
        return float(value)
    if type(value) is float and math.isfinite(value):
        return value
    raise BadSidecar(f"{name} is not a finite number")


def _optional_str(record: dict[str, Any], name: str) -> str | None:
    """A stored header value (ETag, Last-Modified) or None: latin-1 text on one line, as it is sent."""
    value = record.get(name)
    if value is not None and (type(value) is not str or not _META_VALUE.match(value)):
        raise BadSidecar(f"{name} is not a header value")
    return value


def _cache_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The version 2 fields: status, header block, age, stale windows, Vary."""
    status = _int(record, "status")
    if not (status == 0 or 100 <= status <= 999):
        raise BadSidecar("status out of range")
    raw_fields = record.get("headers")
    if type(raw_fields) is not list or len(raw_fields) > MAX_FIELDS:
        raise BadSidecar("headers is not a list of fields")
    fields = []
    for field in raw_fields:
        if (type(field) is not list or len(field) != 2 or type(field[0]) is not str or type(field[1]) is not str
                or not _FIELD_NAME.match(field[0]) or not _FIELD_VALUE.match(field[1])):
            raise BadSidecar("a stored header field is not a field")
        fields.append((field[0], field[1]))
    sie = record.get("sie")
    revalidate = record.get("revalidate")
    if type(revalidate) is not bool:
        raise BadSidecar("revalidate is not a boolean")
    vary = record.get("vary")
    if type(vary) is not list or len(vary) > MAX_FIELDS or any(
            type(name) is not str or not _FIELD_NAME.match(name) for name in vary):
        raise BadSidecar("vary is not a list of field names")
    variants = record.get("variants")
    if type(variants) is not str or not _GENERATION.match(variants):
        raise BadSidecar("bad variants generation")
    numbers = {name: _number(record, name) for name in ("age", "swr")}
    if sie is not None:
        numbers["sie"] = _number(record, "sie")
    if any(not 0 <= value <= MAX_TIMESTAMP for value in numbers.values()):
        raise BadSidecar("age or stale window out of range")
    return {
        "status": status,
        "headers": tuple(fields),
        "age": numbers["age"],
        "stale_while_revalidate": numbers["swr"],
        "stale_if_error": numbers.get("sie"),
        "revalidate": revalidate,
        "vary": tuple(vary),
        "variants": variants,
    }


def decode_sidecar(raw: bytes, expected_hash: str, slice_size: int) -> Sidecar:
    """
    Parse and check a sidecar read from the file named after C{expected_hash}.

    @raise BadSidecar: on any inconsistency (syntax, types, key not hashing to the file name,
        another slice size, bitmap not matching the size, absurd numbers).
    """
    if len(raw) > MAX_SIDECAR_BYTES:
        raise BadSidecar("sidecar too large")
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadSidecar(f"unparseable: {e}") from None
    if type(record) is not dict:
        raise BadSidecar("not an object")
    version = record.get("version")
    if type(version) is not int or version not in (1, SIDECAR_VERSION):
        raise BadSidecar("unknown version")
    key = record.get("key")
    if type(key) is not str or key_hash(key) != expected_hash:
        raise BadSidecar("key does not match the file name")
    size = _int(record, "size")
    if not 0 <= size <= MAX_OBJECT_SIZE:
        raise BadSidecar("size out of range")
    if _int(record, "slice_size") != slice_size:
        raise BadSidecar("written with another slice size")
    content_type = record.get("content_type")
    if type(content_type) is not str or not _META_VALUE.match(content_type):
        raise BadSidecar("content_type is not a header value")
    token = record.get("data")
    if type(token) is not str or not _TOKEN.match(token):
        raise BadSidecar("bad data file token")
    hex_bitmap = record.get("present")
    if type(hex_bitmap) is not str:
        raise BadSidecar("present is not a string")
    try:
        present = bytes.fromhex(hex_bitmap)
    except ValueError:
        raise BadSidecar("present is not hex") from None
    count = slice_count(size, slice_size)
    if len(present) != (count + 7) // 8:
        raise BadSidecar("bitmap length does not match the size")
    if count % 8 and present[-1] >> (count % 8):
        raise BadSidecar("bitmap lists slices past the end")
    meta = ObjectMeta(
        key=key,
        size=size,
        etag=_optional_str(record, "etag"),
        last_modified=_optional_str(record, "last_modified"),
        content_type=content_type,
        fetched_at=_number(record, "fetched_at"),
        expires_at=_number(record, "expires_at"),
        **(_cache_fields(record) if version >= 2 else {}),
    )
    last_used = _number(record, "last_used")
    if not 0 <= last_used <= MAX_TIMESTAMP:
        raise BadSidecar("last_used out of range")
    return Sidecar(meta, token, present, last_used)
