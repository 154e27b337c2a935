# -*- test-case-name: tests.test_mp4 -*-
"""
L{SeekIndex}: everything needed to cut one MP4, built once from its moov; L{plan_for_seek}: one cut.

How the moov is read (measured on a 770 kB moov of 82k samples, tests' long_big_moov.mp4):
  - hachoir 3.4 locates every box of that moov in ~1.2 ms, but it accepts lying sizes silently (an
    atom smaller than its header, or running past its parent, is cut or padded with a warning), so the
    box tree is walked by L{h264edge.mp4._boxes} with struct, which checks every size against its parent
    and names the box that lies;
  - hachoir reads the small header boxes (mvhd, tkhd, mdhd, hdlr, elst), ~0.1-0.5 ms each, where its
    field-by-field decoding is cheap and its version handling is convenient;
  - the sample tables are decoded in bulk from the raw bytes (L{h264edge.mp4._tables}); hachoir would
    take ~5 us per entry and reads ctts version 1 offsets as unsigned.

A cut's moov is itself mostly a plan: box headers and the tables that are recomputed are literal bytes,
the tables that are only cut are spans of the original moov in the same object.  On a two-hour clip
(4.6 MB moov, 180k video and 310k audio samples) that took a seek from 4.3-7.8 ms, mostly copying the
moov, to 0.3-0.55 ms, mostly renumbering its 360k chunk offsets and 100k stsc entries; Content-Length
still follows from counts alone.
"""

from __future__ import annotations

import math
import struct
from typing import Callable, Union

from attrs import frozen
from hachoir.parser.container.mp4 import MP4File
from hachoir.stream import StringInputStream

from h264edge.mp4._boxes import (
    MalformedMP4,
    MP4Error,
    Node,
    SeekOutOfRange,
    UnsupportedMP4,
    _header_at,
    _walk,
    make_box,
    make_full_box,
    walk_moov,
)
from h264edge.mp4._tables import CutTrack, Original, SampleTables
from h264edge.plan import Literal, Plan, Span

MINIMAL_FTYP = make_box(b"ftyp", b"isom" + struct.pack(">I", 512) + b"isomiso2avc1mp41")

# sample entry codes of protected content (ISO/IEC 23001-7, Apple FairPlay)
_PROTECTED_ENTRIES = frozenset({b"encv", b"enca", b"enct", b"encs", b"encf", b"encm", b"drmi", b"drms"})
# sample table boxes copied into a cut; the rest either are rebuilt or number samples and are dropped
_KEPT_STBL = frozenset({b"stsd", b"sgpd"})
_MEDIA_KINDS = (b"vide", b"soun")
# tracks of samples that each show for a time (subtitles, captions, chapter titles, timed metadata): kept
# and cut by time; a sample showing at the cut or at the end is shortened to the window
_TIMED_KINDS = frozenset({b"text", b"sbtl", b"subt", b"clcp", b"meta"})


@frozen
class Container:
    """A box to rebuild around new children (its size is computed while rendering)."""

    type: bytes
    items: tuple["Item", ...]


# bytes: copied verbatim; str: a marker filled per cut ("mvhd", "traks", "chpl", "tkhd", "tref", "edts", "mdhd",
# "tables")
Item = Union[bytes, str, Container]


class _MoovWriter:
    """
    The output moov as it is written: built bytes, L{Original} pieces and chunk-offset holes, with the
    running length (a box's size is patched into its header when the box is closed).
    """

    def __init__(self, use64: bool) -> None:
        self.use64 = use64
        self.length = 0
        self.parts: list[bytes | bytearray | memoryview | Original | CutTrack] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.parts.append(data)
        self.length += len(data)

    def copy(self, piece: Original) -> None:
        self.parts.append(piece)
        self.length += piece.length

    def offsets_hole(self, cut: CutTrack) -> None:
        self.parts.append(cut)
        self.length += cut.offsets_box_size(self.use64)

    def render(self, items: tuple[Item, ...], fill: dict[str, Callable[["_MoovWriter"], None]]) -> None:
        for item in items:
            if isinstance(item, bytes):
                self.write(item)
            elif isinstance(item, str):
                fill[item](self)
            else:
                header = bytearray(b"\0\0\0\0" + item.type)
                start = self.length
                self.write(header)
                self.render(item.items, fill)
                struct.pack_into(">I", header, 0, self.length - start)


@frozen
class _Header:
    """A header box (mvhd, tkhd, mdhd) kept whole, with where its duration field sits."""

    data: bytes
    duration_at: int
    wide: bool

    def with_duration(self, duration: int) -> bytes:
        patched = bytearray(self.data)
        if self.wide:
            struct.pack_into(">Q", patched, self.duration_at, min(duration, 0xFFFFFFFFFFFFFFFF))
        else:
            struct.pack_into(">I", patched, self.duration_at, min(duration, 0xFFFFFFFF))
        return bytes(patched)


def _hachoir(moov: bytes, node: Node, field: str) -> object:
    """The hachoir field set of one small header box, parsed on its own."""
    try:
        parser = MP4File(StringInputStream(moov[node.start : node.end]))
        return parser["atom[0]/" + field]
    except Exception as error:  # hachoir raises a zoo of its own errors on bad bytes
        raise MalformedMP4(f"{node.type.decode('latin-1')} box cannot be parsed: {error}") from error


def _value(fields: object, name: str, box: str) -> int | str:
    try:
        value = fields[name].value  # type: ignore[index]
    except Exception as error:
        raise MalformedMP4(f"{box}: cannot read {name}: {error}") from error
    if not isinstance(value, (int, str)):
        raise MalformedMP4(f"{box}: unexpected {name} {value!r}")
    return value


def _int(fields: object, name: str, box: str) -> int:
    value = _value(fields, name, box)
    if not isinstance(value, int):
        raise MalformedMP4(f"{box}: {name} is not a number")
    return value


def _header(moov: bytes, node: Node, narrow_at: int, wide_at: int) -> _Header:
    version = moov[node.payload_start] if node.end > node.payload_start else -1
    if version not in (0, 1):
        raise UnsupportedMP4(f"{node.type.decode('latin-1')} version {version}")
    wide = version == 1
    at = node.payload_start + (wide_at if wide else narrow_at)
    if at + (8 if wide else 4) > node.end:
        raise MalformedMP4(f"{node.type.decode('latin-1')} box is truncated")
    return _Header(moov[node.start : node.end], at - node.start, wide)


def _check_sample_entries(moov: bytes, stsd: Node, name: str) -> None:
    payload = stsd.payload_start
    if stsd.end - payload < 8:
        raise MalformedMP4(f"{name}: stsd is truncated")
    (count,) = struct.unpack_from(">I", moov, payload + 4)
    if count == 0:
        raise UnsupportedMP4(f"{name}: no sample description")
    at = payload + 8
    for _ in range(count):
        if stsd.end - at < 8:
            raise MalformedMP4(f"{name}: stsd claims {count} descriptions but is truncated")
        size, entry = struct.unpack_from(">I4s", moov, at)
        if size < 8 or at + size > stsd.end:
            raise MalformedMP4(f"{name}: sample description {entry!r} claims {size} bytes")
        if entry in _PROTECTED_ENTRIES or b"sinf" in moov[at : at + size]:
            raise UnsupportedMP4(f"{name}: encrypted samples ({entry.decode('latin-1')})")
        at += size


@frozen(eq=False)
class Track:
    """
    One audio, video or timed (L{_TIMED_KINDS}: subtitles, chapter titles...) track: its tables, timing,
    the tracks it references (tref) and the template to rebuild its trak.
    """

    track_id: int
    kind: bytes  # the handler type: b"vide", b"soun" or one of _TIMED_KINDS
    timescale: int  # media timescale
    tables: SampleTables
    empty: int  # leading empty edit, movie timescale
    media_time: int  # media time shown at presentation time C{empty}
    presentation_end: float  # seconds
    tkhd: _Header
    mdhd: _Header
    template: tuple[Item, ...]
    references: tuple[tuple[bytes, tuple[int, ...]], ...] = ()  # (tref type, track ids)

    @property
    def timed(self) -> bool:
        return self.kind in _TIMED_KINDS

    def shown_at(self, sample: int, movie_timescale: int) -> float:
        """The presentation time (s) at which C{sample} is shown."""
        tables = self.tables
        shown = tables.dts(sample) + tables.composition_offset(sample) - self.media_time
        return shown / self.timescale + self.empty / movie_timescale

    def references_box(self, kept: frozenset[int]) -> bytes:
        """This track's tref naming only the C{kept} tracks (nothing when none is left)."""
        boxes = b""
        for kind, ids in self.references:
            alive = [track_id for track_id in ids if track_id in kept]
            if alive:
                boxes += make_box(kind, struct.pack(f">{len(alive)}I", *alive))
        return make_box(b"tref", boxes) if boxes else b""

    def media_at(self, seconds: float, movie_timescale: int) -> int:
        """
        The media time shown at presentation time C{seconds} (may be before the media starts).

        @raise ValueError: if C{seconds} is too large to count in media ticks (L{_cuts} maps ends at or
            past the duration to None, so times asked for here are within the presentation).
        """
        ticks = (seconds - self.empty / movie_timescale) * self.timescale + 1e-6
        if not math.isfinite(ticks):
            raise ValueError(f"time {seconds} s is out of range")
        return self.media_time + math.floor(ticks)

    @property
    def memory_size(self) -> int:
        references = sum(64 + 8 * len(ids) for _, ids in self.references)
        return (self.tables.memory_size + _items_size(self.template) + len(self.tkhd.data) + len(self.mdhd.data)
                + references + 300)


def _items_size(items: tuple[Item, ...]) -> int:
    total = 0
    for item in items:
        if isinstance(item, bytes):
            total += len(item) + 33
        elif isinstance(item, Container):
            total += _items_size(item.items) + 64
    return total


def _raw(moov: bytes, node: Node) -> bytes:
    return moov[node.start : node.end]


def _stbl_items(moov: bytes, stbl: Node) -> tuple[Item, ...]:
    kept: list[Item] = [_raw(moov, child) for child in stbl.children if child.type in _KEPT_STBL]
    return (*kept, "tables")


def _minf_items(moov: bytes, minf: Node) -> tuple[Item, ...]:
    return tuple(
        Container(b"stbl", _stbl_items(moov, child)) if child.type == b"stbl" else _raw(moov, child)
        for child in minf.children
    )


def _mdia_items(moov: bytes, mdia: Node) -> tuple[Item, ...]:
    items: list[Item] = []
    for child in mdia.children:
        if child.type == b"mdhd":
            items.append("mdhd")
        elif child.type == b"minf":
            items.append(Container(b"minf", _minf_items(moov, child)))
        else:
            items.append(_raw(moov, child))
    return tuple(items)


def _trak_items(moov: bytes, trak: Node) -> tuple[Item, ...]:
    items: list[Item] = []
    for child in trak.children:
        if child.type == b"tkhd":
            items += ["tkhd", "edts"]
        elif child.type == b"edts":
            continue  # rebuilt per cut
        elif child.type == b"tref":
            items.append("tref")  # rebuilt per cut: references may name tracks the cut leaves out
        elif child.type == b"mdia":
            items.append(Container(b"mdia", _mdia_items(moov, child)))
        else:
            items.append(_raw(moov, child))
    return tuple(items)


def _path(node: Node, *types: bytes) -> Node | None:
    found: Node | None = node
    for box_type in types:
        if found is None:
            return None
        found = found.find(box_type)
    return found


def _children(moov: bytes, node: Node) -> tuple[Node, ...] | None:
    """The boxes inside C{node} (not one of the containers the moov walk descends into), or None."""
    try:
        return _walk(moov, node.payload_start, node.end, node.type, 2)
    except MP4Error:
        return None


def _references(moov: bytes, trak: Node) -> tuple[tuple[bytes, tuple[int, ...]], ...]:
    """(type, track ids) of each reference in C{trak}'s tref; none when it is absent or unreadable."""
    tref = trak.find(b"tref")
    boxes = _children(moov, tref) if tref is not None else None
    if boxes is None:
        return ()
    references = []
    for box in boxes:
        length = box.end - box.payload_start
        if length % 4:
            return ()
        references.append((box.type, struct.unpack_from(f">{length // 4}I", moov, box.payload_start)))
    return tuple(references)


@frozen
class _Chapters:
    """
    The Nero chapter list of moov/udta/chpl: C{head} is the payload up to the chapter count (version,
    flags and, in version 1, a reserved word); each entry is (start in 100 ns units, the rest of it:
    title length and title).  A chapter lasts until the next one starts (the last: to the end).
    """

    head: bytes
    entries: tuple[tuple[int, bytes], ...]

    @classmethod
    def parse(cls, moov: bytes, chpl: Node) -> "_Chapters | None":
        payload = moov[chpl.payload_start : chpl.end]
        if len(payload) < 5:
            return None
        head = 8 if payload[0] == 1 else 4
        if len(payload) <= head:
            return None
        count = payload[head]
        at = head + 1
        entries = []
        for _ in range(count):
            if at + 9 > len(payload) or at + 9 + payload[at + 8] > len(payload):
                return None
            (start,) = struct.unpack_from(">Q", payload, at)
            rest_end = at + 9 + payload[at + 8]
            entries.append((start, payload[at + 8 : rest_end]))
            at = rest_end
        return cls(payload[:head], tuple(entries))

    def cut(self, start: float, end: float) -> bytes:
        """
        The chpl of an answer showing source times C{start} to C{end} (s): chapters that end by
        C{start} or begin at or after C{end} are left out, the rest move back by C{start} (the first
        kept one to 0).  Nothing when no chapter is left.
        """
        shift, stop = round(start * 10**7), round(end * 10**7)
        kept = []
        for i, (at, rest) in enumerate(self.entries):
            ends = self.entries[i + 1][0] if i + 1 < len(self.entries) else None
            if (ends is not None and ends <= shift) or at >= stop:
                continue
            kept.append(struct.pack(">Q", max(at - shift, 0)) + rest)
        if not kept:
            return b""
        return make_box(b"chpl", self.head + bytes([len(kept)]) + b"".join(kept))

    @property
    def memory_size(self) -> int:
        return 200 + sum(80 + len(rest) for _, rest in self.entries)


def _udta_items(moov: bytes, udta: Node) -> tuple[tuple[Item, ...], "_Chapters | None"]:
    """moov/udta as a template with its chpl a marker, and the chapters; None when there is no usable chpl."""
    children = _children(moov, udta)
    chpl = None if children is None else next((child for child in children if child.type == b"chpl"), None)
    chapters = None if chpl is None else _Chapters.parse(moov, chpl)
    if children is None or chpl is None or chapters is None:
        return (), None
    return tuple("chpl" if child is chpl else _raw(moov, child) for child in children), chapters


def _edits(moov: bytes, trak: Node, name: str) -> list[tuple[int, int]]:
    """(duration in movie timescale, media time or -1) of each edit of C{trak}."""
    elst = _path(trak, b"edts", b"elst")
    if elst is None:
        return []
    payload = elst.payload_start
    if elst.end - payload < 8:
        raise MalformedMP4(f"{name}: elst is truncated")
    version = moov[payload]
    (count,) = struct.unpack_from(">I", moov, payload + 4)
    entry = 20 if version == 1 else 12
    if version not in (0, 1):
        raise UnsupportedMP4(f"{name}: elst version {version}")
    if count * entry > elst.end - payload - 8:
        raise MalformedMP4(f"{name}: elst claims {count} edits but holds {(elst.end - payload - 8) // entry}")
    fields = _hachoir(moov, elst, "elst")
    edits = []
    for i in range(count):
        duration = _int(fields, f"duration[{i}]", f"{name} elst")
        media = _int(fields, f"time[{i}]", f"{name} elst")
        edits.append((duration, media))
    return edits


# what indexing bad bytes may raise besides MP4Error (SeekIndex.from_moov maps them to MalformedMP4)
_BAD_BYTES = (ArithmeticError, IndexError, KeyError, ValueError, TypeError, struct.error)


def _track(moov: bytes, trak: Node, movie_timescale: int, file_size: int) -> Track | None:
    """
    The usable audio, video or timed track in C{trak}, or None for other kinds (timecode, hint...).  A
    timed track (subtitles, chapter titles) that cannot be used is left out, as other kinds are; an
    audio or video one is an error.
    """
    tkhd = trak.find(b"tkhd")
    mdia = trak.find(b"mdia")
    if tkhd is None or mdia is None:
        raise MalformedMP4("trak without tkhd or mdia")
    track_id = _int(_hachoir(moov, tkhd, "track_hdr"), "track_id", "tkhd")
    name = f"track {track_id}"
    hdlr = mdia.find(b"hdlr")
    mdhd = mdia.find(b"mdhd")
    if hdlr is None or mdhd is None:
        raise MalformedMP4(f"{name}: mdia without hdlr or mdhd")
    kind = str(_value(_hachoir(moov, hdlr, "hdlr"), "subtype", f"{name} hdlr")).encode("latin-1")
    if kind in _MEDIA_KINDS:
        return _sampled_track(moov, trak, tkhd, mdia, mdhd, track_id, kind, movie_timescale, file_size)
    if kind not in _TIMED_KINDS:
        return None
    try:
        return _sampled_track(moov, trak, tkhd, mdia, mdhd, track_id, kind, movie_timescale, file_size)
    except (MP4Error, *_BAD_BYTES):
        return None


def _sampled_track(
    moov: bytes, trak: Node, tkhd: Node, mdia: Node, mdhd: Node, track_id: int, kind: bytes, movie_timescale: int,
    file_size: int,
) -> Track:
    name = f"track {track_id}"
    timescale = _int(_hachoir(moov, mdhd, "media_hdr"), "time_scale", f"{name} mdhd")
    if timescale <= 0:
        raise MalformedMP4(f"{name}: media timescale {timescale}")
    stbl = _path(mdia, b"minf", b"stbl")
    if stbl is None:
        raise MalformedMP4(f"{name}: no sample table (minf/stbl)")
    stsd = stbl.find(b"stsd")
    if stsd is None:
        raise UnsupportedMP4(f"{name}: no sample descriptions (stsd)")
    _check_sample_entries(moov, stsd, name)
    tables = SampleTables.decode(moov, stbl, name)
    tables.check_data_within(file_size, name)

    empty = 0
    media_time = 0
    media_duration = 0
    total = tables.total_duration
    edits = _edits(moov, trak, name)
    for position, (duration, media) in enumerate(edits):
        if media == -1:
            if media_duration == 0 and position < len(edits) - 1:
                empty += duration
            continue
        if media < 0:
            raise MalformedMP4(f"{name}: edit with media time {media}")
        if media_duration == 0 and media_time == 0:
            media_time = media
        media_duration += duration
    if media_duration > 0:
        end = (empty + media_duration) / movie_timescale
    else:
        end = empty / movie_timescale + max(total - media_time, 0) / timescale
    return Track(
        track_id=track_id,
        kind=kind,
        timescale=timescale,
        tables=tables,
        empty=empty,
        media_time=media_time,
        presentation_end=end,
        tkhd=_header(moov, tkhd, 20, 28),
        mdhd=_header(moov, mdhd, 16, 24),
        template=_trak_items(moov, trak),
        references=_references(moov, trak),
    )


@frozen(eq=False)
class SeekIndex:
    """
    Everything needed to cut one MP4 file, built once per clip from its moov and cached by the caller.

    C{duration} is in seconds; C{memory_size} approximates the bytes held, for a byte-budget LRU.
    """

    ftyp: bytes
    moov_offset: int
    movie_timescale: int
    mvhd: _Header
    moov_template: tuple[Item, ...]
    tracks: tuple[Track, ...]  # audio, video and timed tracks, in the file's order
    file_size: int
    duration: float  # of the audio and video tracks
    memory_size: int
    chapters: _Chapters | None = None  # moov/udta/chpl, rewritten per cut

    @property
    def video(self) -> Track | None:
        for track in self.tracks:
            if track.kind == b"vide":
                return track
        return None

    @classmethod
    def from_moov(cls, moov: bytes, moov_offset: int, file_size: int, ftyp: bytes | None) -> "SeekIndex":
        """
        Index a file from its complete C{moov} box (header included) found at C{moov_offset} of a
        C{file_size}-byte file, and its complete C{ftyp} box if it has one.

        @raise UnsupportedMP4: fragmented, encrypted, or without an audio or video track.
        @raise MalformedMP4: anything inconsistent.
        """
        moov = bytes(moov)
        try:
            return cls._from_moov(moov, moov_offset, file_size, ftyp)
        except MP4Error:
            raise
        except (ArithmeticError, IndexError, KeyError, ValueError, TypeError, struct.error) as error:
            raise MalformedMP4(f"moov cannot be indexed: {type(error).__name__}: {error}") from error

    @classmethod
    def _from_moov(cls, moov: bytes, moov_offset: int, file_size: int, ftyp: bytes | None) -> "SeekIndex":
        if moov_offset < 0 or moov_offset + len(moov) > file_size:
            raise MalformedMP4(f"moov of {len(moov)} bytes at {moov_offset} does not fit a {file_size}-byte file")
        if ftyp is not None and (len(ftyp) < 8 or ftyp[4:8] != b"ftyp"):
            raise MalformedMP4("the ftyp given is not an ftyp box")
        root = walk_moov(moov)
        if root.find(b"mvex") is not None:
            raise UnsupportedMP4("fragmented MP4 (mvex in moov): samples live in moof boxes")
        mvhd_node = root.find(b"mvhd")
        if mvhd_node is None:
            raise MalformedMP4("moov without mvhd")
        movie_timescale = _int(_hachoir(moov, mvhd_node, "movie_hdr"), "time_scale", "mvhd")
        if movie_timescale <= 0:
            raise MalformedMP4(f"movie timescale {movie_timescale}")
        mvhd = _header(moov, mvhd_node, 16, 24)

        tracks: list[Track] = []
        for trak in root.find_all(b"trak"):
            track = _track(moov, trak, movie_timescale, file_size)
            if track is not None:
                tracks.append(track)
        media = [track for track in tracks if not track.timed]
        if not media:
            raise UnsupportedMP4("no audio or video track with samples")

        template: list[Item] = []
        chapters: _Chapters | None = None
        for child in root.children:
            if child.type == b"mvhd":
                template.append("mvhd")
            elif child.type == b"trak":
                if "traks" not in template:
                    template.append("traks")
            elif child.type == b"udta" and chapters is None:
                udta, chapters = _udta_items(moov, child)
                template.append(Container(b"udta", udta) if chapters is not None else _raw(moov, child))
            else:
                template.append(_raw(moov, child))
        kept_ftyp = bytes(ftyp) if ftyp is not None else MINIMAL_FTYP
        items = tuple(template)
        memory = sum(track.memory_size for track in tracks) + _items_size(items) + len(kept_ftyp) + 500
        if chapters is not None:
            memory += chapters.memory_size
        return cls(
            ftyp=kept_ftyp,
            moov_offset=moov_offset,
            movie_timescale=movie_timescale,
            mvhd=mvhd,
            moov_template=items,
            tracks=tuple(tracks),
            file_size=file_size,
            duration=max(track.presentation_end for track in media),
            memory_size=memory,
            chapters=chapters,
        )


@frozen(eq=False)
class _TrackCut:
    track: Track
    cut: CutTrack
    empty: int  # movie timescale
    media_time: int  # new media time shown first
    segment: int  # movie timescale

    def edts(self) -> bytes:
        edits = ([(self.empty, -1)] if self.empty else []) + [(self.segment, self.media_time)]
        wide = any(d > 0xFFFFFFFF or m > 0x7FFFFFFF for d, m in edits)
        fmt = ">QqI" if wide else ">IiI"
        entries = b"".join(struct.pack(fmt, d, m, 0x10000) for d, m in edits)
        return make_box(b"edts", make_full_box(b"elst", int(wide), 0, struct.pack(">I", len(edits)) + entries))


SNAP_TOLERANCE_MIN = 0.001
"""
A C{start} at most half a video frame (the keyframe's own duration), and at least this many seconds,
before a keyframe starts the answer at that keyframe rather than a GOP earlier: players send keyframe
times rounded down (7.333333 for 7.3333...).
"""


def _snap_tolerance(video: Track, key: int) -> float:
    tables = video.tables
    frame = (tables.dts(key + 1) - tables.dts(key)) / video.timescale
    return max(frame / 2, SNAP_TOLERANCE_MIN)


def _keyframe(video: Track, start: float, movie_timescale: int) -> tuple[int, float, bool]:
    """
    The sync sample to cut C{video} at for C{start}, the presentation time (s) it shows at, and whether
    the video shows no keyframe by C{start} (it starts later: the answer starts at C{start} and the
    video keeps an empty edit in front, as the source plays).
    """
    tables = video.tables
    target = video.media_at(start, movie_timescale)
    key = tables.sync_at_or_before(tables.last_at_or_before(target))
    for _ in range(16):  # a sync sample shown after the target (B-frame reordering): one more GOP back
        if tables.dts(key) + tables.composition_offset(key) <= target:
            break
        previous = tables.previous_sync(key)
        if previous is None:
            break
        key = previous
    shown = video.shown_at(key, movie_timescale)
    after = key if shown > start else tables.next_sync(key)
    if after is not None:
        after_shown = video.shown_at(after, movie_timescale)
        if start < after_shown <= start + _snap_tolerance(video, after):
            return after, after_shown, False
    return key, shown, shown > start


def _frame_boundary(video: Track, end: float, movie_timescale: int) -> float:
    """
    Where an answer ending at C{end} stops: when the first video frame shown at or after C{end} starts,
    so that the frames shown are whole and the reference frames decoded before C{end} but shown after
    it stay hidden by the edit list.  When no frame starts at or after C{end}, C{end} falls in the last
    frame (which is shown whole, up to the video's end) or after the video.
    """
    tables = video.tables
    target = video.media_at(end, movie_timescale)
    decoded = tables.count_before(target)
    first = None
    # a frame shown at or after the target is decoded at most a reordering depth (16 in H.264) away
    for sample in range(max(decoded - 32, 0), min(decoded + 32, tables.sample_count)):
        shown = tables.dts(sample) + tables.composition_offset(sample)
        if shown >= target and (first is None or shown < first):
            first = shown
    if first is None:
        return max(end, video.presentation_end)
    return max((first - video.media_time) / video.timescale + video.empty / movie_timescale, end)


def _cut_track(
    track: Track, cut_time: float, end: float | None, movie_timescale: int, first: int | None
) -> _TrackCut | None:
    """An audio or video track cut at a sync sample (pre-roll and lead-in hidden by the edit list)."""
    tables = track.tables
    starts_at = track.empty / movie_timescale
    lead = 0.0
    if cut_time < starts_at:
        lead = starts_at - cut_time
        target = track.media_time
    else:
        target = track.media_at(cut_time, movie_timescale)
    if first is None:
        first = tables.sync_at_or_before(max(tables.last_at_or_before(target), 0))
        if track.kind == b"soun" and tables.stss is None and first > 0:
            first -= 1  # one frame of decoder pre-roll (AAC), hidden by the edit list
    if first >= tables.sample_count:
        return None
    shown_until = track.presentation_end if end is None else min(end, track.presentation_end)
    visible = shown_until - max(cut_time, starts_at)
    if visible <= 0:
        return None
    stop = tables.sample_count if end is None else tables.count_before(track.media_at(end, movie_timescale))
    # however short the window, keep what is shown at the cut: the keyframe (and the frames decoded up to
    # the time shown, with B-frames) or the audio frame playing, not a pre-roll frame alone
    shown_at_cut = max(first, tables.last_at_or_before(target)) + 1
    stop = max(stop, min(shown_at_cut, tables.sample_count))
    if stop <= first:
        return None
    return _TrackCut(
        track=track,
        cut=tables.cut(first, stop),
        empty=round(lead * movie_timescale),
        media_time=max(target - tables.dts(first), 0),
        segment=max(round(visible * movie_timescale), 1),
    )


def _cut_timed(track: Track, cut_time: float, end: float, movie_timescale: int) -> _TrackCut | None:
    """
    A timed track (subtitles, chapter titles) cut to source times C{cut_time}..C{end}: the sample
    showing at C{cut_time} starts the answer with what is left of its duration, the one showing at
    C{end} stops there; None when it shows nothing in between.
    """
    tables = track.tables
    starts_at = track.empty / movie_timescale
    shown_until = min(end, track.presentation_end)
    visible = shown_until - max(cut_time, starts_at)
    if visible <= 0:
        return None
    lead = max(starts_at - cut_time, 0.0)
    target = track.media_time if lead else track.media_at(cut_time, movie_timescale)
    stop_time = track.media_at(shown_until, movie_timescale)
    first = max(tables.last_at_or_before(target), 0)
    if first >= tables.sample_count or stop_time <= max(target, tables.dts(first)):
        return None
    stop = max(tables.count_before(stop_time), first + 1)
    head = max(target - tables.dts(first), 0)
    tail = max(tables.dts(stop) - stop_time, 0)
    return _TrackCut(
        track=track,
        cut=tables.cut(first, stop, head, tail),
        empty=round(lead * movie_timescale),
        media_time=0,
        segment=max(round(visible * movie_timescale), 1),
    )


def plan_for_seek(index: SeekIndex, key: str, start: float, end: float | None, exact: bool = False) -> Plan:
    """
    The answer for C{?start=&end=} on the file C{key}: C{Plan((Literal(ftyp + moov + mdat header),
    Span(key, first sample byte, data length), ...))}, times in seconds; one span per run of the
    original's sample data the answer keeps (a chapter track's samples may sit far from the rest).

    Every track is cut at the sync sample of the first video track at or before C{start}; with C{exact},
    the lead-in from that keyframe is kept but hidden by edit lists so that playback starts at C{start}.

    Edge cases, as a video engineer would expect them (nginx's mp4 module refuses a cut it cannot make
    rather than answer a different kind of file):
      - a C{start} less than half a video frame (at least L{SNAP_TOLERANCE_MIN}) before a keyframe
        starts at that keyframe (players send keyframe times rounded down), not a whole GOP earlier;
      - a C{start} before the video shows its first keyframe (video that starts after the audio)
        keeps every track from C{start}, the video with its empty edit in front, as the source plays;
      - the answer ends when the first video frame at or after C{end} is shown: frames are shown whole,
        and the reference frames decoded before C{end} but shown after it (B-frames) are kept but
        hidden by the edit list, so the answer's duration and the frames a player shows agree;
      - C{end} at or past the duration (even C{1e308} or infinity) is the same as no C{end};
      - a window shorter than a frame still holds what is shown at its start: the keyframe (with
        B-frames, the frames decoded up to the time shown) and the audio frame playing, so
        C{start=0&end=1e-9} is a one-frame clip, not an empty or audio-only one;
      - an answer for a file with video always holds its first video track: a cut that would leave
        no video (the window ends before the video starts, or an exact start past the end of a video
        shorter than the audio) is a L{SeekOutOfRange}, as is a cut that leaves no samples at all;
      - a track with nothing to show in the window (audio that starts later, or ended earlier) is
        left out;
      - timed tracks (subtitles, captions, chapter titles, timed metadata) are kept and cut to the
        window (L{_cut_timed}), no further than the end of the audio and video; track references
        (tref) name only tracks the answer keeps, and the Nero chapter list (udta/chpl) is shifted
        and cut the same way (L{_Chapters.cut}).

    @raise SeekOutOfRange: if C{start} is at or past the duration, the window ends before the keyframe
        it starts at is shown, or the cut would leave no video or no samples.
    @raise MalformedMP4: if the cut would reach past the end of the file.
    @raise ValueError: if C{start} is negative or not finite, or C{end} is not after C{start} (NaN
        included).
    """
    if not math.isfinite(start) or start < 0:
        raise ValueError(f"start {start} must be a finite time >= 0")
    if end is not None and not end > start:
        raise ValueError(f"end {end} must be after start {start}")
    if start >= index.duration:
        raise SeekOutOfRange(f"start {start:.3f} s is at or past the duration {index.duration:.3f} s")
    try:
        return _plan(index, key, start, end, exact)
    except MP4Error:
        raise
    except _BAD_BYTES as error:
        raise MalformedMP4(f"cannot cut: {type(error).__name__}: {error}") from error


@frozen
class _Window:
    """The source times an answer shows (s): from C{start} (its time 0) to C{end}, or to the end (None)."""

    start: float
    end: float | None


def _cuts(index: SeekIndex, start: float, end: float | None, exact: bool) -> tuple[_Window, list[_TrackCut]]:
    """The window shown for C{start}..C{end}, and how each track is cut for it (at least one track)."""
    if end is not None and end >= index.duration:
        end = None  # to the end; also keeps huge ends (1e308, inf) out of the integer time arithmetic
    timescale = index.movie_timescale
    video = index.video
    keyframe: int | None = None
    cut_time = start
    if video is not None:
        keyframe, shown, late = _keyframe(video, start, timescale)
        cut_time = start if late else max(shown, start if exact else 0.0)
        if end is not None:
            end = _frame_boundary(video, end, timescale)
            if end >= index.duration:
                end = None
    if end is not None and end <= cut_time:
        raise SeekOutOfRange(f"nothing to show between {cut_time:.3f} s and {end:.3f} s")

    cuts: list[_TrackCut] = []
    for track in index.tracks:
        if track.timed:
            cut = _cut_timed(track, cut_time, index.duration if end is None else end, timescale)
        else:
            cut = _cut_track(track, cut_time, end, timescale, keyframe if track is video else None)
        if cut is not None:
            cuts.append(cut)
    if not any(not cut.track.timed for cut in cuts):
        raise SeekOutOfRange(f"no samples from {cut_time:.3f} s on")
    if video is not None and not any(cut.track is video for cut in cuts):
        window = f"from {cut_time:.3f} s" + ("" if end is None else f" to {end:.3f} s")
        raise SeekOutOfRange(
            f"no video to show {window}: video track {video.track_id} shows from "
            f"{video.empty / timescale:.3f} s to {video.presentation_end:.3f} s, and an answer without its "
            "video is refused"
        )
    return _Window(cut_time, end), cuts


def _regions(cuts: list[_TrackCut]) -> list[tuple[int, int]]:
    """
    The runs [lo, hi) of original bytes the answer's mdat holds, in file order: each track's kept
    sample data, merged where they overlap or touch (audio and video interleave; a chapter track's
    few samples may sit megabytes away, and the bytes between are not sent).
    """
    regions: list[list[int]] = []
    for lo, hi in sorted((cut.cut.lo, cut.cut.hi) for cut in cuts):
        if regions and lo <= regions[-1][1]:
            regions[-1][1] = max(regions[-1][1], hi)
        else:
            regions.append([lo, hi])
    return [(lo, hi) for lo, hi in regions]


def _plan(index: SeekIndex, key: str, start: float, end: float | None, exact: bool) -> Plan:
    window, cuts = _cuts(index, start, end, exact)
    regions = _regions(cuts)
    data_length = sum(hi - lo for lo, hi in regions)
    if data_length + 8 <= 0xFFFFFFFF:
        mdat = struct.pack(">I4s", data_length + 8, b"mdat")
    else:
        mdat = struct.pack(">I4sQ", 1, b"mdat", data_length + 16)
    movie_duration = max(cut.empty + cut.segment for cut in cuts)
    kept = frozenset(cut.track.track_id for cut in cuts)
    chapters = index.chapters
    shown_end = index.duration if window.end is None else window.end

    for use64 in (False, True):
        moov = _MoovWriter(use64)

        def traks(out: _MoovWriter) -> None:
            for cut in cuts:
                _render_trak(cut, kept, out)

        fill: dict[str, Callable[[_MoovWriter], None]] = {
            "mvhd": lambda out: out.write(index.mvhd.with_duration(movie_duration)),
            "traks": traks,
            "chpl": lambda out: out.write(chapters.cut(window.start, shown_end) if chapters is not None else b""),
        }
        moov.render((Container(b"moov", index.moov_template),), fill)
        data_start = len(index.ftyp) + moov.length + len(mdat)
        if use64 or data_start + data_length <= 0xFFFFFFFF:
            break
    # where each region starts in the answer, and so how far each track's chunks move
    moved: list[tuple[int, int, int]] = []  # (lo, hi, delta)
    at = data_start
    for lo, hi in regions:
        moved.append((lo, hi, at - lo))
        at += hi - lo

    def delta(cut: CutTrack) -> int:
        return next(shift for lo, hi, shift in moved if lo <= cut.lo and cut.hi <= hi)

    parts: list[Literal | Span] = []
    literal: list[bytes | bytearray | memoryview] = [index.ftyp]
    for part in moov.parts:
        if isinstance(part, CutTrack):
            literal += part.offsets_box(delta(part), use64)
        elif not isinstance(part, Original):
            literal.append(part)
        else:
            parts += (Literal(b"".join(literal)), Span(key, index.moov_offset + part.at, part.length))
            literal = []
    literal.append(mdat)
    parts.append(Literal(b"".join(literal)))
    parts += (Span(key, lo, hi - lo) for lo, hi in regions)
    plan = Plan(tuple(parts))
    reach = plan.spans_end(key)
    if reach > index.file_size:
        raise MalformedMP4(f"the cut reaches byte {reach} of a {index.file_size}-byte file")
    return plan


def _render_trak(cut: _TrackCut, kept: frozenset[int], out: _MoovWriter) -> None:
    track = cut.track

    def tables(out: _MoovWriter) -> None:
        for piece in cut.cut.pieces:
            if isinstance(piece, Original):
                out.copy(piece)
            else:
                out.write(piece)
        out.offsets_hole(cut.cut)

    fill: dict[str, Callable[[_MoovWriter], None]] = {
        "tkhd": lambda out: out.write(track.tkhd.with_duration(cut.empty + cut.segment)),
        "tref": lambda out: out.write(track.references_box(kept)),
        "edts": lambda out: out.write(cut.edts()),
        "mdhd": lambda out: out.write(track.mdhd.with_duration(cut.cut.media_duration)),
        "tables": tables,
    }
    out.render((Container(b"trak", track.template),), fill)
