# -*- test-case-name: tests.test_mp4 -*-
"""
ISO BMFF box headers and a strict walker over the box tree of a moov.

Every size is checked against its parent: a box that claims more bytes than its parent holds, or fewer
than its own header, is a L{MalformedMP4}, never a silent misparse.
"""

from __future__ import annotations

import struct

from attrs import frozen

from h264edge.errors import EdgeError

BOX_HEADER_READ = 16
"""How many bytes a caller should read at each top-level offset to call L{parse_box_header}."""

# Boxes we descend into while indexing; everything else is kept or dropped as opaque bytes.
CONTAINERS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"})
_MAX_DEPTH = 8


class MP4Error(EdgeError):
    """Base class: this MP4 cannot be cut (the web layer maps each subclass to one status)."""


class MalformedMP4(MP4Error):
    """The bytes contradict themselves: lying box sizes, truncated tables, inconsistent counts."""


class UnsupportedMP4(MP4Error):
    """Valid, perhaps, but not something we cut: fragmented, encrypted, no usable track, odd layouts."""


class SeekOutOfRange(MP4Error):
    """
    Nothing to answer for the requested window: the start is at or past the end of the presentation,
    or the cut would leave no samples, or no video in a file that has video.
    """


@frozen
class BoxHeader:
    """
    One box header: C{type} is the 4-byte code, C{size} the whole box including its header (a size of
    0 in the file, "to end of file", is resolved), C{header_size} 8 or 16.
    """

    type: bytes
    offset: int
    size: int
    header_size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


def _read_header(data: bytes | memoryview, at: int, readable: int, room: int, where: str) -> tuple[bytes, int, int]:
    """
    (type, size, header_size) of the box whose header starts at C{data[at]}: C{readable} bytes of
    C{data} from there may be read, and the box must fit in the C{room} bytes from there (C{where}
    says where that is, for the error messages).
    """
    if readable < 8:
        raise MalformedMP4(f"{readable} bytes {where}, too few for a box header")
    size, box_type = struct.unpack_from(">I4s", data, at)
    header = 8
    if size == 1:
        if readable < 16:
            raise MalformedMP4(f"box {box_type!r} {where} has a truncated 64-bit size")
        (size,) = struct.unpack_from(">Q", data, at + 8)
        header = 16
    elif size == 0:
        size = room
    if size < header:
        raise MalformedMP4(f"box {box_type!r} {where} claims {size} bytes, less than its header")
    if size > room:
        raise MalformedMP4(f"box {box_type!r} {where} claims {size} bytes but only {room} remain")
    return bytes(box_type), size, header


def _header_at(data: bytes | memoryview, at: int, limit: int, where: str) -> tuple[bytes, int, int]:
    """(type, size, header_size) of the box starting at C{data[at]}, which must end by C{limit}."""
    return _read_header(data, at, limit - at, limit - at, f"at offset {at} {where}")


def parse_box_header(data: bytes, offset: int, file_size: int) -> BoxHeader:
    """
    Parse the top-level box header found at file offset C{offset}; C{data} holds the bytes read there:
    L{BOX_HEADER_READ} bytes, or fewer when the file ends sooner (at least 8).

    @raise MalformedMP4: for a size smaller than its header or running past C{file_size}, or too few bytes.
    """
    if offset < 0 or offset >= file_size:
        raise MalformedMP4(f"box offset {offset} is outside a file of {file_size} bytes")
    room = file_size - offset
    box_type, size, header = _read_header(data, 0, min(len(data), room), room, f"at file offset {offset}")
    return BoxHeader(box_type, offset, size, header)


@frozen
class Node:
    """A box inside the moov: offsets are relative to the moov buffer; C{children} only for containers."""

    type: bytes
    start: int
    end: int
    header_size: int
    children: tuple["Node", ...] = ()

    @property
    def payload_start(self) -> int:
        return self.start + self.header_size

    def find(self, box_type: bytes) -> "Node | None":
        for child in self.children:
            if child.type == box_type:
                return child
        return None

    def find_all(self, box_type: bytes) -> list["Node"]:
        return [child for child in self.children if child.type == box_type]


def _walk(data: bytes, start: int, end: int, parent: bytes, depth: int) -> tuple[Node, ...]:
    if depth > _MAX_DEPTH:
        raise UnsupportedMP4(f"boxes nested deeper than {_MAX_DEPTH} levels")
    nodes: list[Node] = []
    at = start
    where = f"in {parent.decode('latin-1')!r}"
    while at < end:
        if end - at < 8 and not any(data[at:end]):
            break  # QuickTime's zero terminator, harmless
        box_type, size, header = _header_at(data, at, end, where)
        children: tuple[Node, ...] = ()
        if box_type in CONTAINERS:
            children = _walk(data, at + header, at + size, box_type, depth + 1)
        nodes.append(Node(box_type, at, at + size, header, children))
        at += size
    return tuple(nodes)


def walk_moov(moov: bytes) -> Node:
    """The box tree of a complete moov box (header included), descending into L{CONTAINERS}."""
    box_type, size, header = _header_at(moov, 0, len(moov), "of the moov buffer")
    if box_type != b"moov":
        raise MalformedMP4(f"expected a moov box, found {box_type!r}")
    if size != len(moov):
        raise MalformedMP4(f"moov box claims {size} bytes but {len(moov)} were given")
    return Node(b"moov", 0, size, header, _walk(moov, header, size, b"moov", 1))


def make_box(box_type: bytes, payload: bytes) -> bytes:
    """A box with a 32-bit size (or a 64-bit largesize when it does not fit)."""
    size = len(payload) + 8
    if size <= 0xFFFFFFFF:
        return struct.pack(">I4s", size, box_type) + payload
    return struct.pack(">I4sQ", 1, box_type, size + 8) + payload


def make_full_box(box_type: bytes, version: int, flags: int, payload: bytes) -> bytes:
    return make_box(box_type, struct.pack(">I", (version << 24) | flags) + payload)


def full_box_header(box_type: bytes, version: int, flags: int, payload_length: int) -> bytes:
    """The header L{make_full_box} writes before a payload of C{payload_length} bytes."""
    size = payload_length + 12
    if size <= 0xFFFFFFFF:
        return struct.pack(">I4sI", size, box_type, (version << 24) | flags)
    return struct.pack(">I4sQI", 1, box_type, size + 8, (version << 24) | flags)
