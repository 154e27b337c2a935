# -*- test-case-name: tests.test_flv -*-
"""
FLV pseudo-streaming: answer C{clip.flv?start=BYTES} with a playable stream starting at tag C{BYTES}.

Like nginx's flv module the answer is an FLV header followed by the file from C{BYTES}; unlike it,
the header is followed by a copy of the onMetaData tag and of the AVC and AAC sequence-header tags
(timestamps set to 0), so that an H.264/AAC answer decodes on its own.  For other codecs (VP6, MP3,
...) there is no sequence header to repeat and the prelude is the header plus the metadata tag.

Players take C{BYTES} from onMetaData's C{keyframes.filepositions}, which are offsets of tag starts.
For H.264 files only the start of a video keyframe tag is accepted (what those positions are): an
answer from any other tag would show nothing until the next keyframe, seconds later.  Other offsets
are refused (HTTP 400) rather than snapped back to the keyframe before them, as MP4 seeks are: finding
it without a trusted index means reading the file backwards tag by tag, and the players that send byte
offsets take them from the index.  Files of other codecs (VP6, Sorenson, audio only) accept any tag.

This module is pure: no Twisted, no I/O.  Callers read the first L{FLV_HEAD_READ} bytes of the file,
call L{parse_flv_head} once, keep the L{FLVIndex}, and build each answer with L{plan_for_flv_seek}.
"""

from __future__ import annotations

import bisect
import math
import struct
import sys
from typing import Union

from attrs import frozen

from h264edge.plan import Literal, Plan, Span

__all__ = [
    "FLV_HEAD_READ",
    "BadFLVOffset",
    "FLVError",
    "FLVHeadTooShort",
    "FLVIndex",
    "MalformedFLV",
    "CHECK_TAG_READ",
    "check_tag_at",
    "is_known_keyframe",
    "parse_flv_head",
    "plan_for_flv_seek",
]

FLV_HEAD_READ = 65536
"""How many bytes from the start of the file the caller reads and passes to L{parse_flv_head}."""

TAG_AUDIO = 8
TAG_VIDEO = 9
TAG_SCRIPT = 18
_TAG_TYPES = frozenset({TAG_AUDIO, TAG_VIDEO, TAG_SCRIPT})

_CODEC_AVC = 7
_SOUND_FORMAT_AAC = 10

_TAG_HEADER_SIZE = 11
_PREVIOUS_TAG_SIZE = 4
_FILE_HEADER_SIZE = 9

_AMF_MAX_DEPTH = 16


class FLVError(Exception):
    """Base class of the errors this module raises."""


class MalformedFLV(FLVError):
    """The bytes are not a usable FLV file (bad signature, lying sizes, truncation, bad metadata)."""


class FLVHeadTooShort(MalformedFLV):
    """
    The metadata or sequence-header tags do not fit in the bytes given to L{parse_flv_head}.

    C{needed} is how many bytes from the start of the file would have been enough to see them, so a
    caller that wants to can read that much and try again.
    """

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


class BadFLVOffset(FLVError):
    """A requested start offset is out of range or is not the start of a tag."""


@frozen
class FLVIndex:
    """
    What an FLV seek needs to know about one file, built from its first bytes by L{parse_flv_head}.

    @ivar size: the file's size in bytes.
    @ivar header: the 13-byte FLV header (9-byte header with data offset 9, and PreviousTagSize0).
    @ivar prelude: C{header} then the metadata and sequence-header tags, each with its
        PreviousTagSize and timestamp 0; sent before the bytes from the seek offset.
    @ivar first_tag_offset: the offset of the first tag in the file; no seek may start before it.
    @ivar keyframe_positions: sorted tag offsets from onMetaData's C{keyframes.filepositions}
        (only those inside the file), empty if the metadata has no such index.
    @ivar memory_size: an estimate of the bytes this index holds in memory, for cache accounting.
    @ivar h264: the video is H.264 (an AVC sequence header came before the first frame): seeks must
        start on a video keyframe tag.
    """

    size: int
    header: bytes
    prelude: bytes
    first_tag_offset: int
    keyframe_positions: tuple[int, ...]
    memory_size: int
    h264: bool = False


# -- AMF0 --------------------------------------------------------------------------------------

AMFValue = Union[float, bool, str, None, "dict[str, AMFValue]", "list[AMFValue]"]

_AMF_NUMBER = 0x00
_AMF_BOOLEAN = 0x01
_AMF_STRING = 0x02
_AMF_OBJECT = 0x03
_AMF_NULL = 0x05
_AMF_UNDEFINED = 0x06
_AMF_ECMA_ARRAY = 0x08
_AMF_OBJECT_END = 0x09
_AMF_STRICT_ARRAY = 0x0A
_AMF_DATE = 0x0B
_AMF_LONG_STRING = 0x0C


class _AMF0Reader:
    """
    A strict reader of the AMF0 subset found in FLV script tags.

    Every read is checked against the end of the data and every container against
    L{_AMF_MAX_DEPTH}; each value consumes at least one byte, so decoding is bounded by the length
    of the data.  Text is decoded as UTF-8 with replacement: a badly encoded title should not make
    a file unseekable.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def _take(self, count: int) -> bytes:
        end = self.position + count
        if end > len(self.data):
            raise MalformedFLV(
                f"AMF0 value needs {count} bytes at {self.position} but the script tag ends at {len(self.data)}"
            )
        chunk = self.data[self.position : end]
        self.position = end
        return chunk

    def _u8(self) -> int:
        return self._take(1)[0]

    def _u16(self) -> int:
        return int.from_bytes(self._take(2), "big")

    def _u32(self) -> int:
        return int.from_bytes(self._take(4), "big")

    def _double(self) -> float:
        value: float = struct.unpack(">d", self._take(8))[0]
        return value

    def _text(self, length: int) -> str:
        return self._take(length).decode("utf-8", errors="replace")

    def at_end(self) -> bool:
        return self.position >= len(self.data)

    def read_value(self, depth: int = 0) -> AMFValue:
        if depth > _AMF_MAX_DEPTH:
            raise MalformedFLV(f"AMF0 values nested deeper than {_AMF_MAX_DEPTH}")
        marker = self._u8()
        if marker == _AMF_NUMBER:
            return self._double()
        if marker == _AMF_BOOLEAN:
            return self._u8() != 0
        if marker == _AMF_STRING:
            return self._text(self._u16())
        if marker == _AMF_LONG_STRING:
            return self._text(self._u32())
        if marker in (_AMF_NULL, _AMF_UNDEFINED):
            return None
        if marker == _AMF_OBJECT:
            return self._read_properties(depth, ecma=False)
        if marker == _AMF_ECMA_ARRAY:
            self._u32()  # an advisory count; the properties end with the object-end marker
            return self._read_properties(depth, ecma=True)
        if marker == _AMF_STRICT_ARRAY:
            count = self._u32()
            if count > len(self.data) - self.position:
                raise MalformedFLV(f"AMF0 strict array claims {count} items in fewer bytes")
            return [self.read_value(depth + 1) for _ in range(count)]
        if marker == _AMF_DATE:
            milliseconds = self._double()
            self._take(2)  # time zone: reserved, always 0 per the AMF0 specification
            return milliseconds
        raise MalformedFLV(f"unsupported AMF0 type marker 0x{marker:02x} at {self.position - 1}")

    def _read_properties(self, depth: int, ecma: bool) -> dict[str, AMFValue]:
        properties: dict[str, AMFValue] = {}
        while True:
            # Some muxers end an ECMA array with the script tag instead of the end marker.
            if ecma and self.at_end():
                return properties
            key_length = self._u16()
            if key_length == 0:
                if self._u8() != _AMF_OBJECT_END:
                    raise MalformedFLV(f"AMF0 empty property name not followed by object end at {self.position - 1}")
                return properties
            key = self._text(key_length)
            properties[key] = self.read_value(depth + 1)


def _parse_script(body: bytes) -> tuple[str, AMFValue]:
    """The name and first argument of a script tag (C{"onMetaData"}, an ECMA array)."""
    reader = _AMF0Reader(body)
    name = reader.read_value()
    if not isinstance(name, str):
        raise MalformedFLV("script tag does not start with an AMF0 string name")
    value = None if reader.at_end() else reader.read_value()
    return name, value


def _keyframe_positions(metadata: AMFValue, first_tag_offset: int, size: int) -> tuple[int, ...]:
    """
    The usable offsets of onMetaData's C{keyframes.filepositions}.

    Entries that are not whole numbers inside the file are dropped rather than fatal: a bad index
    only means those offsets get checked with L{check_tag_at} like any other.
    """
    if not isinstance(metadata, dict):
        return ()
    keyframes = metadata.get("keyframes")
    if not isinstance(keyframes, dict):
        return ()
    positions = keyframes.get("filepositions")
    if not isinstance(positions, list):
        return ()
    usable = set()
    for position in positions:
        if isinstance(position, float) and math.isfinite(position) and position.is_integer():
            offset = int(position)
            if first_tag_offset <= offset < size:
                usable.add(offset)
    return tuple(sorted(usable))


# -- tags --------------------------------------------------------------------------------------


@frozen
class _TagHeader:
    offset: int
    tag_type: int
    data_size: int

    @property
    def end(self) -> int:
        """The offset just past this tag's data, where its PreviousTagSize starts."""
        return self.offset + _TAG_HEADER_SIZE + self.data_size

    @property
    def next_offset(self) -> int:
        return self.end + _PREVIOUS_TAG_SIZE


def _tag_header(data: bytes, at: int, offset: int) -> _TagHeader:
    """Decode the 11-byte tag header at C{data[at:]}, which is file offset C{offset}."""
    raw_type = data[at]
    data_size = int.from_bytes(data[at + 1 : at + 4], "big")
    return _TagHeader(offset=offset, tag_type=raw_type, data_size=data_size)


def _timestamp_zeroed(tag: bytes) -> bytes:
    """A copy of a whole tag with its timestamp (3 bytes and the extension byte) set to 0."""
    return tag[:4] + b"\x00\x00\x00\x00" + tag[8:]


def _is_avc_sequence_header(body: bytes) -> bool:
    return len(body) >= 2 and body[0] & 0x0F == _CODEC_AVC and body[1] == 0


def _is_aac_sequence_header(body: bytes) -> bool:
    return len(body) >= 2 and body[0] >> 4 == _SOUND_FORMAT_AAC and body[1] == 0


def _too_short(what: str, offset: int, needed: int, head_length: int) -> FLVHeadTooShort:
    return FLVHeadTooShort(
        f"{what} at offset {offset} ends at byte {needed}, beyond the {head_length} bytes read "
        f"from the start of the file",
        needed,
    )


def parse_flv_head(head: bytes, file_size: int) -> FLVIndex:
    """
    Index an FLV file from its first bytes.

    @param head: the first C{min(FLV_HEAD_READ, file_size)} bytes of the file.
    @param file_size: the size of the whole file.
    @raise MalformedFLV: if C{head} is not the start of an FLV file of C{file_size} bytes, or the
        metadata and sequence-header tags are not all within C{head} (then L{FLVHeadTooShort}).
    """
    if file_size < len(head):
        raise MalformedFLV(f"{len(head)} bytes read from a file said to be {file_size} bytes")
    if len(head) < _FILE_HEADER_SIZE + _PREVIOUS_TAG_SIZE:
        raise MalformedFLV(f"{len(head)} bytes is too short for an FLV header")
    if head[:3] != b"FLV":
        raise MalformedFLV("no FLV signature")
    if head[3] != 1:
        raise MalformedFLV(f"unsupported FLV version {head[3]}")
    data_offset = int.from_bytes(head[5:9], "big")
    if data_offset < _FILE_HEADER_SIZE:
        raise MalformedFLV(f"FLV header claims a data offset of {data_offset}")
    first_tag_offset = data_offset + _PREVIOUS_TAG_SIZE
    if first_tag_offset > len(head):
        raise MalformedFLV(f"FLV data offset {data_offset} is beyond the {len(head)} bytes read")
    header = head[:5] + _FILE_HEADER_SIZE.to_bytes(4, "big") + bytes(_PREVIOUS_TAG_SIZE)

    metadata_tag = b""
    metadata: AMFValue = None
    avc_tag = b""
    aac_tag = b""
    offset = first_tag_offset
    # Every pass moves on by at least 15 bytes, and we stop at the end of the head.
    while offset < file_size:
        if offset + _TAG_HEADER_SIZE > file_size:
            raise MalformedFLV(f"the file ends inside the tag header at offset {offset}")
        if offset + _TAG_HEADER_SIZE > len(head):
            raise _too_short("the tag header", offset, offset + _TAG_HEADER_SIZE, len(head))
        tag = _tag_header(head, offset, offset)
        if tag.tag_type not in _TAG_TYPES:
            raise MalformedFLV(f"unknown FLV tag type {tag.tag_type} at offset {offset}")
        if tag.next_offset > file_size:
            raise MalformedFLV(
                f"tag at offset {offset} claims {tag.data_size} data bytes, past the end of the {file_size}-byte file"
            )
        body_start = offset + _TAG_HEADER_SIZE
        if tag.tag_type != TAG_SCRIPT:
            first_bytes = head[body_start : min(body_start + 2, tag.end)]
            if tag.data_size >= 2 and len(first_bytes) < 2:
                raise _too_short("the media tag", offset, body_start + 2, len(head))
            sequence_header = (tag.tag_type == TAG_VIDEO and _is_avc_sequence_header(first_bytes)) or (
                tag.tag_type == TAG_AUDIO and _is_aac_sequence_header(first_bytes)
            )
            if not sequence_header:
                break  # the first frame: everything a decoder needs has been seen
        if tag.next_offset > len(head):
            what = "the script tag" if tag.tag_type == TAG_SCRIPT else "the sequence-header tag"
            raise _too_short(what, offset, tag.next_offset, len(head))
        previous_size = int.from_bytes(head[tag.end : tag.next_offset], "big")
        if previous_size != _TAG_HEADER_SIZE + tag.data_size:
            raise MalformedFLV(
                f"tag at offset {offset} has {tag.data_size} data bytes but is followed by a "
                f"PreviousTagSize of {previous_size}"
            )
        whole_tag = _timestamp_zeroed(head[offset : tag.end]) + head[tag.end : tag.next_offset]
        body = head[body_start : tag.end]
        if tag.tag_type == TAG_SCRIPT:
            if not metadata_tag:
                name, value = _parse_script(body)
                if name == "onMetaData":
                    metadata_tag, metadata = whole_tag, value
        elif tag.tag_type == TAG_VIDEO:
            avc_tag = avc_tag or whole_tag
        else:
            aac_tag = aac_tag or whole_tag
        offset = tag.next_offset

    keyframe_positions = _keyframe_positions(metadata, first_tag_offset, file_size)
    prelude = header + metadata_tag + avc_tag + aac_tag
    memory_size = (
        sys.getsizeof(header)
        + sys.getsizeof(prelude)
        + sys.getsizeof(keyframe_positions)
        + sum(sys.getsizeof(position) for position in keyframe_positions)
        + 128  # the index object itself and its small ints
    )
    return FLVIndex(
        size=file_size,
        header=header,
        prelude=prelude,
        first_tag_offset=first_tag_offset,
        keyframe_positions=keyframe_positions,
        memory_size=memory_size,
        h264=bool(avc_tag),
    )


def _check_offset_in_file(index: FLVIndex, offset: int) -> None:
    if offset < index.first_tag_offset:
        raise BadFLVOffset(f"start {offset} is before the first tag at {index.first_tag_offset}")
    if offset >= index.size:
        raise BadFLVOffset(f"start {offset} is not before the end of the {index.size}-byte file")


CHECK_TAG_READ = _PREVIOUS_TAG_SIZE + _TAG_HEADER_SIZE + 2
"""How many bytes of the file from C{offset - 4} L{check_tag_at} looks at."""


def check_tag_at(index: FLVIndex, offset: int, data: bytes) -> None:
    """
    Check that a seek may start at C{offset}: a tag starts there, and in an H.264 file it is a video
    keyframe (frame type 1, AVC packet type 1).  Offsets listed in C{index.keyframe_positions} are
    checked too: that list is the file's word, and a wrong entry would send a broken stream.

    @param data: L{CHECK_TAG_READ} bytes of the file from C{offset - 4} (fewer only at its end): the
        PreviousTagSize of the tag before, the tag header at C{offset}, the first bytes of its data.
    @raise BadFLVOffset: if C{offset} is out of range or the bytes do not look like a tag boundary
        (an unknown tag type, a PreviousTagSize that the bytes before could not hold, a non-zero
        stream id, or data running past the end of the file), or the tag is not a video keyframe of
        an H.264 file.
    """
    _check_offset_in_file(index, offset)
    needed = _PREVIOUS_TAG_SIZE + _TAG_HEADER_SIZE
    if len(data) < needed:
        raise BadFLVOffset(f"start {offset} leaves fewer than {needed} bytes for a tag header")
    previous_size = int.from_bytes(data[:_PREVIOUS_TAG_SIZE], "big")
    tag = _tag_header(data, _PREVIOUS_TAG_SIZE, offset)
    if tag.tag_type not in _TAG_TYPES:
        raise BadFLVOffset(f"start {offset} is not a tag: type byte {tag.tag_type}")
    if data[_PREVIOUS_TAG_SIZE + 8 : needed] != b"\x00\x00\x00":
        raise BadFLVOffset(f"start {offset} is not a tag: non-zero stream id")
    if tag.next_offset > index.size:
        raise BadFLVOffset(f"start {offset} is not a tag: its {tag.data_size} data bytes run past the end")
    if offset == index.first_tag_offset:
        if previous_size != 0:
            raise BadFLVOffset(f"start {offset} is the first tag but PreviousTagSize0 is {previous_size}")
    elif not _TAG_HEADER_SIZE <= previous_size <= offset - index.first_tag_offset - _PREVIOUS_TAG_SIZE:
        raise BadFLVOffset(f"start {offset} is not a tag: previous tag size {previous_size} does not fit")
    if index.h264:
        body = data[needed : needed + min(tag.data_size, 2)]
        keyframe = tag.tag_type == TAG_VIDEO and len(body) == 2 and body[0] >> 4 == 1 and body[1] == 1
        if not keyframe:
            raise BadFLVOffset(
                f"start {offset} is a tag but not a video keyframe: H.264 answers start on one "
                "(onMetaData keyframes.filepositions lists them)"
            )


def plan_for_flv_seek(index: FLVIndex, key: str, offset: int) -> Plan:
    """
    The answer to C{?start=offset} for the FLV file stored as C{key}: the prelude, then the file
    from C{offset}.  Offset 0 means the whole file, unchanged.

    This does not check that C{offset} is a tag boundary: use L{is_known_keyframe} and
    L{check_tag_at} first.

    @raise BadFLVOffset: if C{offset} is inside the FLV header or not before the end of the file.
    """
    if offset == 0:
        return Plan.whole(key, index.size)
    _check_offset_in_file(index, offset)
    return Plan((Literal(index.prelude), Span(key, offset, index.size - offset)))


def is_known_keyframe(index: FLVIndex, offset: int) -> bool:
    """Whether C{offset} is one of the keyframe tag offsets listed in the file's onMetaData."""
    at = bisect.bisect_left(index.keyframe_positions, offset)
    return at < len(index.keyframe_positions) and index.keyframe_positions[at] == offset
