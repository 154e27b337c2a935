# -*- test-case-name: tests.test_mp4 -*-
"""
MP4 seeking, pure: bytes in, values and plans out (no Twisted, no I/O).

The web layer walks the top-level boxes with L{parse_box_header} (reading L{BOX_HEADER_READ} bytes at
each offset), reads the ftyp and moov, builds a L{SeekIndex} once per clip (kept in a L{SeekIndexCache})
and asks L{plan_for_seek} for each C{?start=} answer.
"""

from h264edge.mp4._boxes import (
    BOX_HEADER_READ,
    BoxHeader,
    MalformedMP4,
    MP4Error,
    SeekOutOfRange,
    UnsupportedMP4,
    parse_box_header,
)
from h264edge.mp4._cache import SeekIndexCache
from h264edge.mp4._index import SeekIndex, plan_for_seek

__all__ = [
    "BOX_HEADER_READ",
    "BoxHeader",
    "MP4Error",
    "MalformedMP4",
    "SeekIndex",
    "SeekIndexCache",
    "SeekOutOfRange",
    "UnsupportedMP4",
    "parse_box_header",
    "plan_for_seek",
]
