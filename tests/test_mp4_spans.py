"""
Tests for the spans in L{h264edge.mp4.plan_for_seek}'s moov: tables that are only cut are sent as
spans of the original moov, and the rendered answer is byte for byte what the first implementation
built in memory (kept here as L{reference_header}, a direct rewrite of every table).
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from array import array
from bisect import bisect_left, bisect_right
from pathlib import Path
from typing import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from h264edge.mp4 import SeekIndex, SeekOutOfRange, plan_for_seek
from h264edge.mp4._boxes import make_full_box
from h264edge.mp4._index import Container, Item, SeekIndex as _SeekIndex, _cuts, _TrackCut
from h264edge.mp4._tables import SampleTables, _be_bytes
from h264edge.plan import Literal, Plan, Span
from tests.test_mp4 import NO_FFMPEG, Clip, _box, _rebuild, load

# -- the reference: every table rewritten in memory, as the first implementation did ----------------


def _shift_column(raw: bytes, width: int, stride: int, delta: int) -> bytes:
    groups = len(raw) // (width * stride)
    if groups == 0 or delta == 0:
        return raw
    unit = b"\0" * (width - 1) + b"\1" + b"\0" * (width * (stride - 1))
    shifted = int.from_bytes(raw, "big") + delta * int.from_bytes(unit * groups, "big")
    return shifted.to_bytes(len(raw), "big")


def _cut_runs(raw: bytes, first_sample: array, s0: int, s1: int) -> tuple[int, bytes]:
    entries = len(first_sample) - 1
    e0 = bisect_right(first_sample, s0, 0, entries) - 1
    e1 = bisect_right(first_sample, s1 - 1, 0, entries) - 1
    body = bytearray(raw[8 * e0 : 8 * e1 + 8])
    struct.pack_into(">I", body, 0, min(first_sample[e0 + 1], s1) - s0)
    if e1 > e0:
        struct.pack_into(">I", body, len(body) - 8, s1 - first_sample[e1])
    return e1 - e0 + 1, bytes(body)


def reference_tables(t: SampleTables, s0: int, s1: int) -> tuple[bytes, bytes, int]:
    """(stts ctts stss stsz stsc boxes, chunk offsets with the first moved to s0, kept chunks)."""
    parts = []
    count, body = _cut_runs(_be_bytes(t.stts), t.stts_first_sample, s0, s1)
    parts.append(make_full_box(b"stts", 0, 0, struct.pack(">I", count) + body))
    if t.ctts_raw is not None and t.ctts_first_sample is not None:
        count, body = _cut_runs(t.ctts_raw, t.ctts_first_sample, s0, s1)
        parts.append(make_full_box(b"ctts", t.ctts_version, 0, struct.pack(">I", count) + body))
    if t.stss is not None:
        j0 = bisect_left(t.stss, s0 + 1)
        j1 = bisect_left(t.stss, s1 + 1)
        body = _shift_column(_be_bytes(t.stss)[4 * j0 : 4 * j1], 4, 1, -s0)
        parts.append(make_full_box(b"stss", 0, 0, struct.pack(">I", j1 - j0) + body))
    if t.uniform_size:
        parts.append(make_full_box(b"stsz", 0, 0, struct.pack(">II", t.uniform_size, s1 - s0)))
    else:
        parts.append(make_full_box(b"stsz", 0, 0, struct.pack(">II", 0, s1 - s0) + t.sizes_raw[4 * s0 : 4 * s1]))

    c0, first0, e0 = t._chunk_of(s0)
    c1, first1, e1 = t._chunk_of(s1 - 1)
    stsc = bytearray(t.stsc_raw[12 * e0 : 12 * e1 + 12])
    struct.pack_into(">I", stsc, 0, c0 + 1)
    stsc = bytearray(_shift_column(bytes(stsc), 4, 3, -c0))
    skipped = s0 - first0
    if skipped:
        per_chunk, description = struct.unpack_from(">II", stsc, 4)
        head = struct.pack(">III", 1, per_chunk - skipped, description)
        if c1 > c0 and (len(stsc) == 12 or struct.unpack_from(">I", stsc, 12)[0] != 2):
            head += struct.pack(">III", 2, per_chunk, description)
        stsc = bytearray(head) + stsc[12:]
    last_chunk = c1 - c0 + 1
    kept_last = s1 - max(first1, s0)
    tail_first, tail_count, tail_description = struct.unpack_from(">III", stsc, len(stsc) - 12)
    if tail_first == last_chunk:
        struct.pack_into(">I", stsc, len(stsc) - 8, kept_last)
    elif tail_count != kept_last:
        stsc += struct.pack(">III", last_chunk, kept_last, tail_description)
    parts.append(make_full_box(b"stsc", 0, 0, struct.pack(">I", len(stsc) // 12) + stsc))

    width = t.offsets.itemsize
    offsets = bytearray(_be_bytes(t.offsets)[c0 * width : (c1 + 1) * width])
    offsets[0:width] = t.sample_offset(s0).to_bytes(width, "big")
    return b"".join(parts), bytes(offsets), c1 - c0 + 1


def _offsets_box(raw: bytes, width: int, count: int, delta: int, use64: bool) -> bytes:
    raw = _shift_column(raw, width, 1, delta)
    if use64 != (width == 8):
        values = array("Q" if width == 8 else "I")
        values.frombytes(raw)
        values.byteswap()
        wide = array("Q" if use64 else "I", values)
        wide.byteswap()
        raw = wide.tobytes()
    return make_full_box(b"co64" if use64 else b"stco", 0, 0, struct.pack(">I", count) + raw)


Fill = Callable[[bytearray], None]


def _render(items: tuple[Item, ...], out: bytearray, fill: dict[str, Fill]) -> None:
    for item in items:
        if isinstance(item, bytes):
            out += item
        elif isinstance(item, str):
            fill[item](out)
        else:
            at = len(out)
            out += b"\0\0\0\0" + item.type
            _render(item.items, out, fill)
            struct.pack_into(">I", out, at, len(out) - at)


def reference_header(index: _SeekIndex, start: float, end: float | None, exact: bool) -> tuple[bytes, int, int]:
    """(ftyp + moov + mdat header, first data byte, data length), every byte built in memory."""
    _, cuts = _cuts(index, start, end, exact)
    lo = min(cut.cut.lo for cut in cuts)
    data_length = max(cut.cut.hi for cut in cuts) - lo
    if data_length + 8 <= 0xFFFFFFFF:
        mdat = struct.pack(">I4s", data_length + 8, b"mdat")
    else:
        mdat = struct.pack(">I4sQ", 1, b"mdat", data_length + 16)
    movie_duration = max(cut.empty + cut.segment for cut in cuts)
    tables = {id(cut): reference_tables(cut.track.tables, cut.cut.s0, cut.cut.s1) for cut in cuts}

    for use64 in (False, True):
        moov = bytearray()
        holes: list[tuple[int, _TrackCut]] = []

        def trak(cut: _TrackCut, out: bytearray) -> None:
            boxes, _, count = tables[id(cut)]

            def write_tables(out: bytearray) -> None:
                out += boxes
                holes.append((len(out), cut))
                out += bytes(16 + count * (8 if use64 else 4))

            fill: dict[str, Fill] = {
                "tkhd": lambda out: out.extend(cut.track.tkhd.with_duration(cut.empty + cut.segment)),
                "edts": lambda out: out.extend(cut.edts()),
                "mdhd": lambda out: out.extend(cut.track.mdhd.with_duration(cut.cut.media_duration)),
                "tables": write_tables,
            }
            _render((Container(b"trak", cut.track.template),), out, fill)

        def traks(out: bytearray) -> None:
            for cut in cuts:
                trak(cut, out)

        movie: dict[str, Fill] = {
            "mvhd": lambda out: out.extend(index.mvhd.with_duration(movie_duration)),
            "traks": traks,
        }
        _render((Container(b"moov", index.moov_template),), moov, movie)
        data_start = len(index.ftyp) + len(moov) + len(mdat)
        if use64 or data_start + data_length <= 0xFFFFFFFF:
            break
    for at, cut in holes:
        _, raw, count = tables[id(cut)]
        box = _offsets_box(raw, cut.track.tables.offsets.itemsize, count, data_start - lo, use64)
        moov[at : at + len(box)] = box
    return index.ftyp + bytes(moov) + mdat, lo, data_length


# -- tests ----------------------------------------------------------------------------------------


def _stz2(box_type: bytes, payload: bytes) -> bytes | None:
    if box_type != b"stsz":
        return None
    uniform, count = struct.unpack_from(">II", payload, 4)
    sizes = struct.unpack_from(f">{count}I", payload, 12) if uniform == 0 else (uniform,) * count
    return _box(b"stz2", b"\0\0\0\0" + struct.pack(">BBBBI", 0, 0, 0, 16, count) + struct.pack(f">{count}H", *sizes))


def _co64(box_type: bytes, payload: bytes) -> bytes | None:
    if box_type != b"stco":
        return None
    (count,) = struct.unpack_from(">I", payload, 4)
    offsets = struct.unpack_from(f">{count}I", payload, 8)
    return _box(b"co64", payload[:8] + struct.pack(f">{count}Q", *offsets))


def _variant(test: SynchronousTestCase, name: str, rewrite: Callable[[bytes, bytes], bytes | None]) -> Clip:
    """av_moov_end.mp4 with its tables rewritten by C{rewrite} (the sample data does not move)."""
    source = load("av_moov_end.mp4")
    directory = tempfile.mkdtemp(prefix="h264edge-mp4-")
    test.addCleanup(shutil.rmtree, directory)
    path = Path(directory) / name
    path.write_bytes(source.data[: source.moov_offset] + _rebuild(source.moov, rewrite))
    return Clip(path)


class SpanPlanTests(SynchronousTestCase):
    skip = NO_FFMPEG

    def assert_same_as_reference(self, source: Clip, start: float, end: float | None, exact: bool) -> None:
        index = source.index()
        try:
            header, lo, length = reference_header(index, start, end, exact)
        except SeekOutOfRange:
            self.assertRaises(SeekOutOfRange, plan_for_seek, index, "clip", start, end, exact)
            return
        plan = plan_for_seek(index, "clip", start, end, exact)
        self.assertEqual(plan.length, len(header) + length)
        self.assertEqual(plan.parts[-1], Span("clip", lo, length))
        self.assertEqual(Plan(plan.parts[:-1]).render(source.read), header)
        for span in list(plan.spans())[:-1]:
            self.assertGreaterEqual(span.offset, source.moov_offset)
            self.assertLessEqual(span.offset + span.length, source.moov_offset + len(source.moov))

    def check_clip(self, source: Clip) -> None:
        duration = source.index().duration
        for fraction in (0.0, 0.1, 0.37, 0.5, 0.73, 0.99):
            start = duration * fraction
            for end in (None, start + 0.5, start + 3.3, duration * 2):
                for exact in (False, True):
                    self.assert_same_as_reference(source, start, end, exact)

    def test_moov_at_end_renders_as_reference(self) -> None:
        self.check_clip(load("av_moov_end.mp4"))

    def test_bframes_with_ctts_render_as_reference(self) -> None:
        self.check_clip(load("bframes.mp4"))

    def test_input_edit_list_renders_as_reference(self) -> None:
        self.check_clip(load("edit_list.mp4"))

    def test_audio_only_renders_as_reference(self) -> None:
        self.check_clip(load("audio_only.mp4"))

    def test_video_only_renders_as_reference(self) -> None:
        self.check_clip(load("video_only.mp4"))

    def test_long_clip_renders_as_reference(self) -> None:
        self.check_clip(load("long_big_moov.mp4"))

    def test_co64_input_renders_as_reference(self) -> None:
        self.check_clip(_variant(self, "co64.mp4", _co64))

    def test_stz2_input_renders_as_reference_without_spans_of_stz2(self) -> None:
        source = _variant(self, "stz2.mp4", _stz2)
        self.check_clip(source)
        at = source.moov.index(b"stz2") - 4
        stz2 = range(source.moov_offset + at, source.moov_offset + at + struct.unpack_from(">I", source.moov, at)[0])
        plan = plan_for_seek(source.index(), "clip", 9.0, None)
        for span in plan.spans():
            self.assertFalse(span.offset in stz2 or span.offset + span.length - 1 in stz2)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        name=st.sampled_from(["bframes.mp4", "av_faststart.mp4", "long_big_moov.mp4"]),
        start=st.floats(min_value=0, max_value=0.999),
        length=st.one_of(st.none(), st.floats(min_value=0.001, max_value=1.5)),
        exact=st.booleans(),
    )
    def test_any_cut_renders_as_reference(self, name: str, start: float, length: float | None, exact: bool) -> None:
        source = load(name)
        duration = source.index().duration
        self.assert_same_as_reference(
            source, start * duration, None if length is None else (start + length) * duration, exact
        )

    def test_sample_sizes_are_one_span_of_the_original_stsz(self) -> None:
        source = load("long_big_moov.mp4")
        plan = plan_for_seek(source.index(), "clip", 600.0, None)
        video = source.index().video
        assert video is not None
        first = 600 * 25  # a keyframe every 2 s
        sizes_at = video.tables.sizes_at
        assert sizes_at is not None
        expected = Span("clip", source.moov_offset + sizes_at + 4 * first, 4 * (video.tables.sample_count - first))
        self.assertIn(expected, plan.parts)

    def test_from_start_only_chunk_offsets_and_headers_are_built(self) -> None:
        source = load("long_big_moov.mp4")
        index = source.index()
        plan = plan_for_seek(index, "clip", 0.0, None)
        built = sum(part.length for part in plan.parts[:-1] if isinstance(part, Literal))
        chunk_offsets = sum(16 + 4 * track.tables.chunk_count for track in index.tracks)
        self.assertLess(built - chunk_offsets, 4096)


class SeekIndexMemoryTests(SynchronousTestCase):
    skip = NO_FFMPEG

    def test_memory_size_covers_the_tables(self) -> None:
        source = load("long_big_moov.mp4")
        index: SeekIndex = source.index()
        held = 0
        for track in index.tracks:
            t = track.tables
            for values in (t.stts, t.stts_first_sample, t.stts_first_time, t.stss, t.offsets,
                           t.stsc_first_sample, t.stsc_per_chunk, t.stsc_first_chunk):
                held += 0 if values is None else values.itemsize * len(values)
            held += len(t.sizes_raw) + len(t.ctts_raw or b"") + len(t.stsc_raw)
        self.assertGreaterEqual(index.memory_size, held)
