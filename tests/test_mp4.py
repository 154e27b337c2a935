"""
Tests for L{h264edge.mp4}: cuts checked with real decoders (ffmpeg/ffprobe), malformed input, the cache.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from operator import sub
from pathlib import Path
from typing import Callable

from hachoir.core import config as hachoir_config
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from h264edge.mp4 import (
    BOX_HEADER_READ,
    BoxHeader,
    MalformedMP4,
    MP4Error,
    SeekIndex,
    SeekIndexCache,
    SeekOutOfRange,
    UnsupportedMP4,
    parse_box_header,
    plan_for_seek,
)
from h264edge.mp4._index import _cuts
from h264edge.plan import Literal, Plan, Span
from tests.media import (
    clip,
    decode_errors,
    edit_list_clip,
    ffprobe_json,
    frame_hashes,
    have_ffmpeg,
    late_video_clip,
    subtitles_clip,
    top_level_boxes,
    VFR_DECODE,
)

NO_FFMPEG = None if have_ffmpeg() else "ffmpeg/ffprobe are not installed"
FRAME = 1 / 25  # every test clip is 25 fps


class Clip:
    """A test file read whole, with its top-level boxes located the way the web layer does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        self.ftyp: bytes | None = None
        offset = 0
        while offset < len(self.data):
            header = parse_box_header(self.data[offset : offset + BOX_HEADER_READ], offset, len(self.data))
            if header.type == b"ftyp":
                self.ftyp = self.data[offset : header.end]
            elif header.type == b"moov":
                self.moov = self.data[offset : header.end]
                self.moov_offset = offset
            offset = header.end

    def index(self) -> SeekIndex:
        return SeekIndex.from_moov(self.moov, self.moov_offset, len(self.data), self.ftyp)

    def read(self, key: str, offset: int, length: int) -> bytes:
        assert key == "clip"
        return self.data[offset : offset + length]


_clips: dict[str, Clip] = {}

# clips only these tests use (tests/media.py holds the shared recipes)
LOCAL_RECIPES: dict[str, list[str]] = {
    # video 10 s, audio 12 s: the video ends first
    "short_video.mp4": [
        "-t", "10", "-f", "lavfi", "-i", "testsrc2=size=160x90:rate=25",
        "-t", "12", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
        "-c:v", "libx264", "-preset", "ultrafast", "-g", "50", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "32k",
    ],
}


# clips made in several ffmpeg steps (tests/media.py)
BUILT: dict[str, Callable[[], Path]] = {
    "edit_list.mp4": edit_list_clip,
    "subs.mp4": subtitles_clip,
    "late_video.mp4": late_video_clip,
}


def load(name: str) -> Clip:
    if name not in _clips:
        if name in BUILT:
            path = BUILT[name]()
        else:
            path = clip(name, LOCAL_RECIPES.get(name))
        _clips[name] = Clip(path)
    return _clips[name]


def streams(path: Path) -> dict[str, dict]:
    info = ffprobe_json(path, "-show_entries", "stream=codec_type,start_time,duration")
    return {stream["codec_type"]: stream for stream in info["streams"]}


def assert_close(test: SynchronousTestCase, actual: float, expected: float, tolerance: float, what: str = "") -> None:
    """Twisted's assertAlmostEqual ignores C{delta}; this does not."""
    if abs(actual - expected) > tolerance:
        test.fail(f"{what} {actual} is not within {tolerance} of {expected}".strip())


def pcm(path: Path) -> array:
    """The first audio stream of C{path} decoded to mono 16-bit samples at the stream's rate."""
    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1", "-f", "s16le", "-"],
        capture_output=True,
        check=True,
    )
    samples = array("h")
    samples.frombytes(result.stdout)
    return samples


def first_video_packet_flags(path: Path) -> str:
    info = ffprobe_json(
        path, "-select_streams", "v:0", "-show_packets", "-read_intervals", "%+#1", "-show_entries", "packet=flags"
    )
    return str(info["packets"][0]["flags"])


def assert_header_then_sample_data(test: SynchronousTestCase, plan: Plan, source: Clip) -> None:
    """
    C{plan} is ftyp + moov + mdat header, built or copied from the original moov, then one span of the
    original's sample data.
    """
    *header, data = plan.parts
    test.assertIsInstance(header[0], Literal)
    test.assertIsInstance(header[-1], Literal)
    assert isinstance(data, Span)
    test.assertEqual(data.key, "clip")
    moov_end = source.moov_offset + len(source.moov)
    test.assertTrue(data.offset + data.length <= source.moov_offset or data.offset >= moov_end)
    for part in header:
        if isinstance(part, Span):
            test.assertEqual(part.key, "clip")
            test.assertGreaterEqual(part.offset, source.moov_offset)
            test.assertLessEqual(part.offset + part.length, moov_end)


class ServedClipMixin:
    """Renders a plan against the original file into a temporary file for the decoders."""

    addCleanup: Callable[..., None]

    def serve(self, name: str, start: float, end: float | None = None, exact: bool = False) -> tuple[Path, Plan]:
        source = load(name)
        plan = plan_for_seek(source.index(), "clip", start, end, exact)
        body = plan.render(source.read)
        assert len(body) == plan.length
        directory = tempfile.mkdtemp(prefix="h264edge-mp4-")
        self.addCleanup(shutil.rmtree, directory)
        out = Path(directory) / "out.mp4"
        out.write_bytes(body)
        return out, plan


class BoxHeaderTests(SynchronousTestCase):
    def test_plain_size(self) -> None:
        self.assertEqual(
            parse_box_header(struct.pack(">I4s", 24, b"ftyp") + b"isom", 0, 100), BoxHeader(b"ftyp", 0, 24, 8)
        )

    def test_largesize(self) -> None:
        data = struct.pack(">I4sQ", 1, b"mdat", 5 << 32)
        self.assertEqual(parse_box_header(data, 10, 10 + (6 << 32)), BoxHeader(b"mdat", 10, 5 << 32, 16))

    def test_size_zero_runs_to_end_of_file(self) -> None:
        self.assertEqual(parse_box_header(struct.pack(">I4s", 0, b"mdat"), 40, 1000), BoxHeader(b"mdat", 40, 960, 8))

    def test_size_smaller_than_header_is_malformed(self) -> None:
        self.assertRaises(MalformedMP4, parse_box_header, struct.pack(">I4s", 7, b"free"), 0, 100)
        self.assertRaises(MalformedMP4, parse_box_header, struct.pack(">I4sQ", 1, b"mdat", 12), 0, 100)

    def test_size_past_end_of_file_is_malformed(self) -> None:
        self.assertRaises(MalformedMP4, parse_box_header, struct.pack(">I4s", 200, b"moov"), 0, 100)

    def test_truncated_header_is_malformed(self) -> None:
        self.assertRaises(MalformedMP4, parse_box_header, b"\0\0\0", 0, 100)
        self.assertRaises(MalformedMP4, parse_box_header, struct.pack(">I4s", 1, b"mdat"), 92, 100)


class SeekDecodeTests(ServedClipMixin, SynchronousTestCase):
    """Cuts decoded by ffmpeg: clean decode, keyframe first, durations and A/V alignment right."""

    skip = NO_FFMPEG

    def check_cut(
        self, name: str, start: float, end: float | None, expected_cut: float, exact: bool = False
    ) -> Path:
        out, plan = self.serve(name, start, end, exact)
        self.assertEqual(decode_errors(out), "")
        boxes = [box[0] for box in top_level_boxes(out)]
        self.assertLess(boxes.index(b"moov"), boxes.index(b"mdat"))
        assert_header_then_sample_data(self, plan, load(name))
        info = streams(out)
        duration = load(name).index().duration
        expected = (min(end, duration) if end is not None else duration) - expected_cut
        for kind, stream in info.items():
            assert_close(self, float(stream["duration"]), expected, FRAME + 0.001, f"{kind} duration")
            assert_close(self, float(stream["start_time"]), 0.0, FRAME, f"{kind} start")
        if "video" in info:
            self.assertTrue(first_video_packet_flags(out).startswith("K"))
        return out

    def test_moov_at_end_seek_snaps_to_keyframe(self) -> None:
        self.check_cut("av_moov_end.mp4", 5.3, None, 4.0)

    def test_faststart_seek_with_end(self) -> None:
        self.check_cut("av_faststart.mp4", 7.0, 12.5, 6.0)

    def test_start_zero_decodes_whole_clip(self) -> None:
        self.check_cut("av_moov_end.mp4", 0.0, None, 0.0)

    def test_bframes_seek(self) -> None:
        self.check_cut("bframes.mp4", 5.3, None, 3.84)

    def test_bframes_exact_seek_hides_lead_in(self) -> None:
        self.check_cut("bframes.mp4", 5.3, 15.0, 5.3, exact=True)

    def test_audio_only_cuts_at_start(self) -> None:
        self.check_cut("audio_only.mp4", 3.3, None, 3.3)

    def test_video_only(self) -> None:
        self.check_cut("video_only.mp4", 19.9, None, 18.0)

    def test_input_edit_list_start_zero_keeps_lead_in_hidden(self) -> None:
        source = edit_list_clip()
        out = self.check_cut("edit_list.mp4", 0.0, None, 0.0)
        self.assertEqual(frame_hashes(out), frame_hashes(source))

    def test_input_edit_list_seek(self) -> None:
        # the copy starts 0.5 s into bframes.mp4 (keyframes every 1.92 s): keyframes show at 1.42 + 1.92 k
        self.check_cut("edit_list.mp4", 6.0, None, 5.26)

    def test_long_clip_seek(self) -> None:
        self.check_cut("long_big_moov.mp4", 1100.3, None, 1100.0)


class FrameAccuracyTests(ServedClipMixin, SynchronousTestCase):
    """The decoded frames of a cut are exactly the original's frames from the cut on."""

    skip = NO_FFMPEG

    def test_keyframe_cut_frames_match_original(self) -> None:
        original = frame_hashes(load("bframes.mp4").path)
        out, _ = self.serve("bframes.mp4", 8.0, 12.0)  # keyframes every 48 frames: 7.68 s
        first = round(7.68 * 25)
        self.assertEqual(frame_hashes(out), original[first : 12 * 25])

    def test_exact_cut_frames_match_original(self) -> None:
        original = frame_hashes(load("bframes.mp4").path)
        out, _ = self.serve("bframes.mp4", 8.0, 12.0, exact=True)
        self.assertEqual(frame_hashes(out), original[8 * 25 : 12 * 25])

    def test_audio_follows_video_cut(self) -> None:
        original = pcm(load("av_faststart.mp4").path)
        out, _ = self.serve("av_faststart.mp4", 10.0, None)
        cut = pcm(out)
        # sample-exact from the cut on (one AAC pre-roll frame, hidden by the edit list, primes the
        # decoder); the last frames differ as the decoder flushes, so compare all but the tail
        rate = 44100
        self.assertEqual(len(cut), len(original) - 10 * rate)
        worst = max(map(abs, map(sub, cut[:-4096], original[10 * rate : -4096])))
        self.assertLessEqual(worst, 2)  # the float decoder rounds +-1 differently with other frame grouping


class TableFormatTests(ServedClipMixin, SynchronousTestCase):
    """co64 and stz2 inputs, made by rewriting a moov-at-end clip's tables (data does not move)."""

    skip = NO_FFMPEG

    def rewritten(self, name: str, rewrite: Callable[[bytes, bytes], bytes | None]) -> str:
        source = load("av_moov_end.mp4")
        moov = _rebuild(source.moov, rewrite)
        data = source.data[: source.moov_offset] + moov
        directory = tempfile.mkdtemp(prefix="h264edge-mp4-")
        self.addCleanup(shutil.rmtree, directory)
        path = Path(directory) / name
        path.write_bytes(data)
        _clips[name] = Clip(path)
        self.addCleanup(_clips.pop, name)
        return name

    def test_co64_input(self) -> None:
        def co64(box_type: bytes, payload: bytes) -> bytes | None:
            if box_type != b"stco":
                return None
            (count,) = struct.unpack_from(">I", payload, 4)
            offsets = struct.unpack_from(f">{count}I", payload, 8)
            return _box(b"co64", payload[:8] + struct.pack(f">{count}Q", *offsets))

        name = self.rewritten("co64.mp4", co64)
        self.assertIn(b"co64", load(name).moov)
        out, _ = self.serve(name, 9.0)
        self.assertEqual(decode_errors(out), "")
        self.assertEqual(frame_hashes(out), frame_hashes(load("av_moov_end.mp4").path)[8 * 25 :])

    def test_output_over_4_gib_uses_co64_and_a_64_bit_mdat(self) -> None:
        gap = 5 << 30
        source = load("av_moov_end.mp4")
        middle = source.moov_offset // 2

        def far_audio(box_type: bytes, payload: bytes) -> bytes | None:
            # pretend the sample data after the middle of the mdat sits 5 GiB further (only offsets
            # change), so that what a cut keeps of both tracks spans more than 4 GiB
            if box_type != b"stco":
                return None
            (count,) = struct.unpack_from(">I", payload, 4)
            offsets = struct.unpack_from(f">{count}I", payload, 8)
            moved = (o + gap if o >= middle else o for o in offsets)
            return _box(b"co64", payload[:8] + struct.pack(f">{count}Q", *moved))

        moov = _rebuild(source.moov, far_audio)
        index = SeekIndex.from_moov(moov, len(source.data) + gap, len(source.data) + gap + len(moov), source.ftyp)
        plan = plan_for_seek(index, "clip", 4.0, None)
        span = plan.parts[-1]
        assert isinstance(span, Span)

        def read(key: str, offset: int, length: int) -> bytes:
            # the moov sits 5 GiB past the end of the real file
            at = offset - index.moov_offset
            self.assertTrue(0 <= at and at + length <= len(moov))
            return moov[at : at + length]

        header = Plan(plan.parts[:-1]).render(read)
        self.assertGreater(span.length, 1 << 32)
        self.assertEqual(header[-16:-8], struct.pack(">I4s", 1, b"mdat"))
        self.assertEqual(struct.unpack(">Q", header[-8:])[0], span.length + 16)
        boxes = _boxes_of(header[:-16])
        (moov_type, moov_at, moov_size), = [b for b in boxes if b[0] == b"moov"]
        out_moov = header[moov_at : moov_at + moov_size]
        self.assertNotIn(b"stco", out_moov)
        # the cut indexes again, with its data where the plan puts it
        again = SeekIndex.from_moov(out_moov, moov_at, plan.length, None)
        assert_close(self, again.duration, 16.0, 0.002)

    def test_stz2_input(self) -> None:
        def stz2(box_type: bytes, payload: bytes) -> bytes | None:
            if box_type != b"stsz":
                return None
            uniform, count = struct.unpack_from(">II", payload, 4)
            sizes = struct.unpack_from(f">{count}I", payload, 12) if uniform == 0 else (uniform,) * count
            if max(sizes) >= 1 << 16:
                raise AssertionError("fixture needs sizes below 64 KiB")
            return _box(b"stz2", b"\0\0\0\0" + struct.pack(">BBBBI", 0, 0, 0, 16, count)
                        + struct.pack(f">{count}H", *sizes))

        name = self.rewritten("stz2.mp4", stz2)
        out, _ = self.serve(name, 9.0)
        self.assertEqual(decode_errors(out), "")
        self.assertEqual(frame_hashes(out), frame_hashes(load("av_moov_end.mp4").path)[8 * 25 :])


def _box(box_type: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", len(payload) + 8, box_type) + payload


def _rebuild(box: bytes, rewrite: Callable[[bytes, bytes], bytes | None]) -> bytes:
    """Rebuild a box tree (32-bit sizes), letting C{rewrite} replace leaf boxes."""
    size, box_type = struct.unpack_from(">I4s", box)
    payload = box[8:size]
    if box_type in (b"moov", b"trak", b"mdia", b"minf", b"stbl"):
        children = []
        at = 0
        while at < len(payload):
            (child_size,) = struct.unpack_from(">I", payload, at)
            children.append(_rebuild(payload[at : at + child_size], rewrite))
            at += child_size
        return _box(box_type, b"".join(children))
    replaced = rewrite(box_type, payload)
    return replaced if replaced is not None else box[:size]


class PlanTests(SynchronousTestCase):
    """Plan shape and seek arguments, without decoding."""

    skip = NO_FFMPEG

    def test_plan_is_header_then_one_span_of_the_sample_data(self) -> None:
        source = load("av_moov_end.mp4")
        plan = plan_for_seek(source.index(), "clip", 5.0, None)
        assert_header_then_sample_data(self, plan, source)
        first, *_, last, span = plan.parts
        assert isinstance(first, Literal) and isinstance(last, Literal) and isinstance(span, Span)
        self.assertEqual(first.data[:8], source.ftyp[:8] if source.ftyp else b"")
        self.assertEqual(last.data[-4:], b"mdat")
        self.assertLessEqual(span.offset + span.length, source.moov_offset)

    def test_start_at_or_past_duration_is_out_of_range(self) -> None:
        index = load("av_moov_end.mp4").index()
        self.assertRaises(SeekOutOfRange, plan_for_seek, index, "clip", index.duration, None)
        self.assertRaises(SeekOutOfRange, plan_for_seek, index, "clip", 1e9, None)

    def test_end_not_after_start_is_a_value_error(self) -> None:
        index = load("av_moov_end.mp4").index()
        self.assertRaises(ValueError, plan_for_seek, index, "clip", 5.0, 5.0)
        self.assertRaises(ValueError, plan_for_seek, index, "clip", 5.0, 4.0)
        self.assertRaises(ValueError, plan_for_seek, index, "clip", -1.0, None)

    def test_missing_ftyp_gets_a_minimal_one(self) -> None:
        source = load("av_faststart.mp4")
        index = SeekIndex.from_moov(source.moov, source.moov_offset, len(source.data), None)
        header = plan_for_seek(index, "clip", 3.0, None).parts[0]
        assert isinstance(header, Literal)
        self.assertEqual(header.data[4:12], b"ftypisom")

    def test_output_indexes_again_with_the_expected_duration(self) -> None:
        source = load("bframes.mp4")
        plan = plan_for_seek(source.index(), "clip", 5.0, 11.0)
        body = plan.render(source.read)
        again = Clip.__new__(Clip)
        again.data = body
        again.ftyp = None
        for box_type, offset, size in _boxes_of(body):
            if box_type == b"moov":
                again.moov, again.moov_offset = body[offset : offset + size], offset
        assert_close(self, again.index().duration, 11.0 - 3.84, 0.002)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        start=st.floats(min_value=0, max_value=19.99),
        length=st.one_of(st.none(), st.floats(min_value=0.01, max_value=30)),
        exact=st.booleans(),
    )
    # an end inside the last frame: that frame is shown whole, to the video's end
    @example(start=1.96875, length=18.0, exact=False)
    def test_any_start_and_end_gives_a_consistent_plan(self, start: float, length: float | None, exact: bool) -> None:
        source = load("bframes.mp4")
        index = source.index()
        end = None if length is None else start + length
        try:
            plan = plan_for_seek(index, "clip", start, end, exact)
        except SeekOutOfRange:
            # only when nothing is left to show between the keyframe and the end
            self.assertIsNotNone(end)
            return
        body = plan.render(source.read)
        self.assertEqual(len(body), plan.length)
        boxes = _boxes_of(body)
        self.assertEqual([b[0] for b in boxes], [b"ftyp", b"moov", b"mdat"])
        moov = next(body[o : o + s] for t, o, s in boxes if t == b"moov")
        again = SeekIndex.from_moov(moov, boxes[1][1], len(body), None)
        # keyframes every 1.92 s; a start within half a frame (0.02 s) before one starts there
        keyframe_time = (int((start + 0.02) / 1.92 + 1e-9)) * 1.92
        shown_from = max(start, keyframe_time) if exact else keyframe_time
        # the answer ends where the first frame at or after the end is shown (frames of 512 ticks of 1/12800 s)
        shown_to = index.duration
        if end is not None:
            shown_to = min(math.ceil(math.floor(end * 12800 + 1e-6) / 512) * 512 / 12800, index.duration)
        assert_close(self, again.duration, shown_to - shown_from, 0.002, "duration")


def _boxes_of(body: bytes) -> list[tuple[bytes, int, int]]:
    out = []
    offset = 0
    while offset < len(body):
        header = parse_box_header(body[offset : offset + 16], offset, len(body))
        out.append((header.type, offset, header.size))
        offset = header.end
    return out


class RefusalTests(SynchronousTestCase):
    """Inputs we refuse, always with an L{MP4Error} subclass."""

    skip = NO_FFMPEG

    def test_fragmented_is_unsupported(self) -> None:
        source = load("fragmented.mp4")
        error = self.assertRaises(UnsupportedMP4, source.index)
        self.assertIn("fragmented", str(error))

    def test_encrypted_sample_entry_is_unsupported(self) -> None:
        source = load("av_faststart.mp4")
        moov = source.moov.replace(b"avc1", b"encv", 1)
        error = self.assertRaises(
            UnsupportedMP4, SeekIndex.from_moov, moov, source.moov_offset, len(source.data), source.ftyp
        )
        self.assertIn("encrypted", str(error))

    def test_truncated_moov_is_malformed(self) -> None:
        source = load("av_moov_end.mp4")
        for cut in (9, 100, len(source.moov) // 2, len(source.moov) - 1):
            moov = struct.pack(">I", cut) + source.moov[4:cut]
            self.assertRaises(MalformedMP4, SeekIndex.from_moov, moov, source.moov_offset, len(source.data), None)

    def test_lying_table_size_is_malformed(self) -> None:
        source = load("av_moov_end.mp4")
        at = source.moov.index(b"stsz") - 4
        (size,) = struct.unpack_from(">I", source.moov, at)
        for lie in (size + 4, size - 4, 3, 0xFFFFFFF0):
            moov = bytearray(source.moov)
            struct.pack_into(">I", moov, at, lie)
            self.assertRaises(
                MalformedMP4, SeekIndex.from_moov, bytes(moov), source.moov_offset, len(source.data), None
            )

    def test_sample_count_mismatch_is_malformed(self) -> None:
        source = load("av_moov_end.mp4")
        at = source.moov.index(b"stsz") + 12  # sample_count
        moov = bytearray(source.moov)
        (count,) = struct.unpack_from(">I", moov, at)
        struct.pack_into(">I", moov, at, count - 1)
        error = self.assertRaises(
            MalformedMP4, SeekIndex.from_moov, bytes(moov), source.moov_offset, len(source.data), None
        )
        self.assertIn("samples", str(error))

    def test_stsc_entry_with_more_samples_than_the_track_is_malformed(self) -> None:
        source = load("av_moov_end.mp4")
        at = source.moov.index(b"stsc") + 12 + 4  # first entry's samples_per_chunk
        for count in (0xFFFFFFFF, 0x80000000):
            moov = bytearray(source.moov)
            struct.pack_into(">I", moov, at, count)
            error = self.assertRaises(
                MalformedMP4, SeekIndex.from_moov, bytes(moov), source.moov_offset, len(source.data), None
            )
            self.assertIn("stsc", str(error))

    def test_lying_sample_size_anywhere_is_malformed(self) -> None:
        """
        One stsz entry of 0x7FFFFFFF: whichever chunk holds it (not only the last one), its samples run
        past the end of the file.  Unchecked, a cut whose last chunk held it answered a 2 GB
        Content-Length for a 1.8 MB file.
        """
        source = load("av_moov_end.mp4")
        first = source.moov.index(b"stsz") + 16  # first entry of the first track's stsz
        (count,) = struct.unpack_from(">I", source.moov, first - 4)
        for sample in (0, 100, 249, count // 2 + 3, count - 1):
            moov = bytearray(source.moov)
            struct.pack_into(">I", moov, first + 4 * sample, 0x7FFFFFFF)
            error = self.assertRaises(
                MalformedMP4, SeekIndex.from_moov, bytes(moov), source.moov_offset, len(source.data), None
            )
            self.assertIn("past the end", str(error))

    def test_lying_chunk_offset_anywhere_is_malformed(self) -> None:
        source = load("av_moov_end.mp4")
        first = source.moov.index(b"stco") + 12  # first chunk offset of the first track
        (count,) = struct.unpack_from(">I", source.moov, first - 4)
        for chunk in (0, count // 2, count - 1):
            moov = bytearray(source.moov)
            struct.pack_into(">I", moov, first + 4 * chunk, len(source.data) - 10)
            self.assertRaises(
                MalformedMP4, SeekIndex.from_moov, bytes(moov), source.moov_offset, len(source.data), None
            )

    def test_sample_data_past_end_of_file_is_malformed(self) -> None:
        source = load("av_faststart.mp4")
        self.assertRaises(MalformedMP4, SeekIndex.from_moov, source.moov, source.moov_offset,
                          len(source.data) - 1000, None)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def test_byte_flips_in_tables_raise_only_mp4_errors(self, data: st.DataObject) -> None:
        self.patch(hachoir_config, "quiet", True)  # hachoir warns on stderr about the odd bytes it sees
        source = load("bframes.mp4")
        moov = bytearray(source.moov)
        table = data.draw(st.sampled_from([b"stts", b"ctts", b"stss", b"stsz", b"stsc", b"stco", b"elst",
                                           b"mdhd", b"tkhd", b"trak", b"stsd", b"hdlr"]))
        begin = moov.index(table) - 4
        flips = data.draw(st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=4))
        for position, value in flips:
            moov[min(begin + position, len(moov) - 1)] = value
        started = time.perf_counter()
        try:
            index = SeekIndex.from_moov(bytes(moov), source.moov_offset, len(source.data), source.ftyp)
            for start in (0.0, 7.0, 13.3):
                try:
                    plan = plan_for_seek(index, "clip", start, None, exact=start > 10)
                except SeekOutOfRange:
                    continue
                self.assertLessEqual(plan.spans_end("clip"), len(source.data))
                plan.render(source.read)
        except MP4Error:
            pass
        self.assertLess(time.perf_counter() - started, 2.0)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def test_byte_flips_anywhere_in_moov_raise_only_mp4_errors(self, data: st.DataObject) -> None:
        self.patch(hachoir_config, "quiet", True)
        source = load("av_moov_end.mp4")
        moov = bytearray(source.moov)
        positions = st.integers(0, len(moov) - 1)
        for position, value in data.draw(st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=8)):
            moov[position] = value
        try:
            index = SeekIndex.from_moov(bytes(moov), source.moov_offset, len(source.data), source.ftyp)
            plan = plan_for_seek(index, "clip", data.draw(st.floats(0, 25)), None)
        except MP4Error:
            return
        self.assertLessEqual(plan.spans_end("clip"), len(source.data))


_indexes: dict[str, SeekIndex] = {}


def cached_index(name: str) -> SeekIndex:
    if name not in _indexes:
        _indexes[name] = load(name).index()
    return _indexes[name]


def reindex(plan: Plan, source: Clip) -> tuple[bytes, SeekIndex]:
    """The rendered answer and its own index (which checks every table and that every track has samples)."""
    body = plan.render(source.read)
    assert len(body) == plan.length
    boxes = _boxes_of(body)
    assert [b[0] for b in boxes] == [b"ftyp", b"moov", b"mdat"], boxes
    moov = next(body[o : o + s] for t, o, s in boxes if t == b"moov")
    return body, SeekIndex.from_moov(moov, boxes[1][1], len(body), None)


def keyframe_times(index: SeekIndex) -> list[float]:
    """When each sync sample of the video track is shown (s), as the index computes presentation times."""
    video = index.video
    if video is None:
        return []
    tables = video.tables
    syncs = range(tables.sample_count) if tables.stss is None else [n - 1 for n in tables.stss]
    times = [
        (tables.dts(k) + tables.composition_offset(k) - video.media_time) / video.timescale
        + video.empty / index.movie_timescale
        for k in syncs
    ]
    return [t for t in times if 0 <= t < index.duration]


def extreme_times(index: SeekIndex) -> list[float]:
    """Times a float-parsing client might send: zeros, tiny, subnormal, huge, and duration and keyframe
    times exactly and one ulp either side."""
    inf = float("inf")
    near = [index.duration, FRAME, *keyframe_times(index)[:6]]
    return [
        0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1e-300, 1e-9, 1e-6, 1e308, sys.float_info.max, inf,
        -5e-324, -1.0, float("nan"),
        *(t for x in near for t in (math.nextafter(x, -inf), x, math.nextafter(x, inf))),
    ]


class ExtremeTimeTests(ServedClipMixin, SynchronousTestCase):
    """
    C{start} and C{end} at the edges of floating point and of the clip: a plan with video whenever the
    source has video, or L{SeekOutOfRange} / ValueError, never another exception.
    """

    skip = NO_FFMPEG

    def test_end_at_or_past_duration_is_no_end(self) -> None:
        for name in ("av_moov_end.mp4", "bframes.mp4", "edit_list.mp4", "audio_only.mp4"):
            index = cached_index(name)
            for start in (0.0, 5.0, math.nextafter(index.duration, 0)):
                for exact in (False, True):
                    whole = plan_for_seek(index, "clip", start, None, exact)
                    for end in (index.duration, math.nextafter(index.duration, math.inf), 1e308, math.inf):
                        self.assertEqual(plan_for_seek(index, "clip", start, end, exact), whole, (name, start, end))

    def test_end_within_the_first_frame_keeps_the_keyframe(self) -> None:
        for name in ("av_moov_end.mp4", "bframes.mp4", "edit_list.mp4", "video_only.mp4"):
            source = load(name)
            for end in (5e-324, 1e-9, FRAME / 2):
                _, again = reindex(plan_for_seek(cached_index(name), "clip", 0.0, end), source)
                video = again.video
                assert video is not None, (name, end)
                self.assertTrue(video.tables.stss is None or video.tables.stss[0] == 1)
                kinds = sorted(track.kind for track in again.tracks)
                self.assertEqual(kinds, sorted(track.kind for track in cached_index(name).tracks), (name, end))

    def test_one_frame_answers_decode(self) -> None:
        for name, start, end, exact, frames in [
            ("av_moov_end.mp4", 0.0, 1e-9, False, 1),
            ("bframes.mp4", 0.0, 5e-324, False, 1),
            ("bframes.mp4", 1.92, math.nextafter(1.92, math.inf), True, 1),
            # the 1 ms shown is the tail of a frame that starts before the input's own edit: ffmpeg never
            # shows a video frame starting before an edit, so it decodes the lead-in and shows nothing
            ("edit_list.mp4", 0.0, 1e-9, False, 0),
        ]:
            out, _ = self.serve(name, start, end, exact)
            self.assertEqual(decode_errors(out), "", (name, start, end))
            self.assertTrue(first_video_packet_flags(out).startswith("K"), (name, start, end))
            self.assertEqual(len(frame_hashes(out)), frames, (name, start, end))

    def test_last_ulp_before_duration_decodes(self) -> None:
        for name, exact in [("av_moov_end.mp4", False), ("bframes.mp4", True), ("audio_only.mp4", True)]:
            start = math.nextafter(cached_index(name).duration, 0)
            out, _ = self.serve(name, start, 1e308, exact)
            self.assertEqual(decode_errors(out), "", name)

    def test_cut_that_would_drop_the_video_is_out_of_range(self) -> None:
        index = cached_index("short_video.mp4")  # video to 10 s, audio to 12 s
        error = self.assertRaises(SeekOutOfRange, plan_for_seek, index, "clip", 11.0, None, True)
        self.assertIn("no video", str(error))
        self.assertRaises(SeekOutOfRange, plan_for_seek, index, "clip", 10.0, 1e308, True)
        # without exact, the cut snaps back to the last keyframe, which the video still shows
        _, again = reindex(plan_for_seek(index, "clip", 11.0, None), load("short_video.mp4"))
        self.assertIsNotNone(again.video)
        assert_close(self, again.duration, 12.0 - 8.0, 0.002)

    def test_huge_end_through_internal_cuts(self) -> None:
        # the helper the span tests call directly normalises the end itself
        index = cached_index("av_moov_end.mp4")
        _, cuts = _cuts(index, 5.0, 1e308, False)
        self.assertEqual([cut.cut.s1 for cut in cuts], [track.tables.sample_count for track in index.tracks])

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def test_extreme_times_give_a_plan_or_a_clean_refusal(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(
            ["av_moov_end.mp4", "bframes.mp4", "edit_list.mp4", "video_only.mp4", "audio_only.mp4",
             "short_video.mp4"]
        ), "clip")
        index = cached_index(name)
        times = extreme_times(index)
        usable = st.sampled_from([t for t in times if 0 <= t < index.duration])
        edges = st.sampled_from(times)  # and the unusable: negative, NaN, infinite, past the end
        anything = st.floats(allow_nan=True, allow_infinity=True)
        start = data.draw(st.one_of(usable, usable, usable, edges, anything), "start")
        lengths = st.sampled_from([t for t in times if t > 0])
        end = data.draw(st.one_of(
            st.none(),
            edges,
            st.integers(1, 3).map(lambda ulps: _ulps_after(start, ulps)),
            lengths.map(lambda length: start + length),
            lengths.map(lambda length: start + length),
            anything,
        ), "end")
        exact = data.draw(st.booleans(), "exact")
        try:
            plan = plan_for_seek(index, "clip", start, end, exact)
        except (SeekOutOfRange, ValueError):
            return
        _, again = reindex(plan, load(name))
        self.assertEqual(again.video is None, index.video is None)
        self.assertGreater(again.duration, 0)
        self.assertLessEqual(again.duration, index.duration + 2 / index.movie_timescale)


def _ulps_after(x: float, ulps: int) -> float:
    for _ in range(ulps):
        x = math.nextafter(x, math.inf)
    return x


def _children(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """(type, payload start, end) of the boxes in C{data[start:end]}, read with plain struct."""
    boxes = []
    while start + 8 <= end:
        size, box_type = struct.unpack_from(">I4s", data, start)
        if size < 8:
            break
        boxes.append((box_type, start + 8, start + size))
        start += size
    return boxes


def _moov_of(body: bytes) -> tuple[int, int]:
    (_, at, size), = [box for box in top_level_boxes_of(body) if box[0] == b"moov"]
    return at, at + size


def top_level_boxes_of(body: bytes) -> list[tuple[bytes, int, int]]:
    return [(t, o, s) for t, o, s in _boxes_of(body)]


def track_links(body: bytes) -> dict[int, dict[bytes, tuple[int, ...]]]:
    """For each track of an answer, by track id: its tref references, by reference type."""
    moov_start, moov_end = _moov_of(body)
    links = {}
    for box_type, start, end in _children(body, moov_start + 8, moov_end):
        if box_type != b"trak":
            continue
        children = {t: (s, e) for t, s, e in _children(body, start, end)}
        tkhd = children[b"tkhd"][0]
        track_id = struct.unpack_from(">I", body, tkhd + (20 if body[tkhd] == 1 else 12))[0]
        references: dict[bytes, tuple[int, ...]] = {}
        if b"tref" in children:
            for kind, s2, e2 in _children(body, *children[b"tref"]):
                references[kind] = struct.unpack_from(f">{(e2 - s2) // 4}I", body, s2)
        links[track_id] = references
    return links


def without_track_references(body: bytes) -> bytes:
    """C{body} with every tref box of its moov renamed free: players then read chapters from udta/chpl."""
    moov_start, moov_end = _moov_of(body)
    return body[:moov_start] + body[moov_start:moov_end].replace(b"tref", b"free") + body[moov_end:]


def subtitles(path: Path) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue of the first subtitle stream, as ffmpeg decodes it to SRT."""
    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:s:0", "-f", "srt", "-"],
        capture_output=True, text=True, check=True,
    )

    def seconds(stamp: str) -> float:
        hours, minutes, rest = stamp.strip().split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(rest.replace(",", "."))

    cues = []
    for block in result.stdout.strip().split("\n\n"):
        lines = block.splitlines()
        start, _, end = lines[1].partition("-->")
        cues.append((seconds(start), seconds(end), "\n".join(lines[2:])))
    return cues


def chapters(path: Path) -> list[tuple[str, float, float]]:
    """(title, start, end) of each chapter, as ffprobe reads them."""
    found = ffprobe_json(path, "-show_chapters")["chapters"]
    return [(c["tags"]["title"], round(float(c["start_time"]), 3), round(float(c["end_time"]), 3)) for c in found]


class TimedTrackTests(ServedClipMixin, SynchronousTestCase):
    """
    subs.mp4 (tests/media.py): 12 s of A/V, a mov_text subtitle track, a chapter text track that the
    other tracks name with C{tref chap}, and the same chapters in udta/chpl (Opening 0-4, Middle
    4-8.5, End 8.5-12); keyframes every 2 s.
    """

    skip = NO_FFMPEG

    def test_source_has_what_the_tests_expect(self) -> None:
        source = load("subs.mp4")
        kinds = {track.kind for track in source.index().tracks}
        self.assertEqual(kinds, {b"vide", b"soun", b"sbtl", b"text"})
        self.assertIsNotNone(source.index().chapters)
        self.assertEqual(subtitles(source.path)[2], (7.0, 9.8, "third cue, long"))

    def test_seek_keeps_subtitles_with_the_cue_showing_at_the_cut(self) -> None:
        out, _ = self.serve("subs.mp4", 9.0)  # cut at the keyframe at 8 s
        self.assertEqual(decode_errors(out), "")
        info = streams(out)
        self.assertEqual(set(info), {"video", "audio", "subtitle", "data"})
        self.assertEqual(info["subtitle"]["codec_name"] if "codec_name" in info["subtitle"] else "mov_text", "mov_text")
        # the cue shown from 7.0 to 9.8 starts the answer with its 1.8 s left; the next keeps its place
        self.assertEqual(subtitles(out), [(0.0, 1.8, "third cue, long"), (2.5, 3.5, "fourth cue")])

    def test_end_cuts_the_cue_showing_at_the_end(self) -> None:
        out, _ = self.serve("subs.mp4", 5.0, 9.2)  # 4.0 .. 9.2
        self.assertEqual(decode_errors(out), "")
        self.assertEqual(subtitles(out), [(0.0, 2.5, "second cue"), (3.0, 5.2, "third cue, long")])
        for kind, stream in streams(out).items():
            assert_close(self, float(stream["duration"]), 5.2, 0.001, f"{kind} duration")

    def test_exact_seek_keeps_subtitles_from_start(self) -> None:
        out, _ = self.serve("subs.mp4", 3.5, 7.5, exact=True)  # 7.5 is inside the frame shown 7.48-7.52
        self.assertEqual(subtitles(out), [(0.0, 3.0, "second cue"), (3.5, 4.02, "third cue, long")])

    def test_chapter_track_is_kept_and_cut(self) -> None:
        out, _ = self.serve("subs.mp4", 9.0)
        self.assertEqual(chapters(out), [("Middle", 0.0, 0.5), ("End", 0.5, 4.0)])
        out, _ = self.serve("subs.mp4", 5.0, 9.2)
        self.assertEqual(chapters(out), [("Middle", 0.0, 4.5), ("End", 4.5, 5.2)])

    def test_chpl_chapters_are_shifted_and_cut(self) -> None:
        """ffprobe reads udta/chpl when no track names a chapter track: the same chapters as the track's."""
        for start, end, expected in [
            (9.0, None, [("Middle", 0.0, 0.5), ("End", 0.5, 4.0)]),
            (5.0, 9.2, [("Middle", 0.0, 4.5), ("End", 4.5, 5.2)]),
            (0.0, 3.0, [("Opening", 0.0, 3.0)]),
            (2.5, 7.0, [("Opening", 0.0, 2.0), ("Middle", 2.0, 5.0)]),  # from the keyframe at 2 s
        ]:
            out, _ = self.serve("subs.mp4", start, end)
            chpl_only = out.with_name("chpl-only.mp4")
            chpl_only.write_bytes(without_track_references(out.read_bytes()))
            self.assertEqual(chapters(chpl_only), expected, f"start={start} end={end}")

    def test_track_references_name_only_tracks_of_the_answer(self) -> None:
        source = load("subs.mp4")
        index = source.index()
        chapter_track = next(track.track_id for track in index.tracks if track.kind == b"text")
        out, _ = self.serve("subs.mp4", 9.0)
        links = track_links(out.read_bytes())
        self.assertEqual(len(links), 4)
        for track_id, references in links.items():
            for ids in references.values():
                self.assertTrue(set(ids) <= set(links), f"track {track_id} names {ids}, not all in {set(links)}")
        video = index.video
        assert video is not None
        self.assertEqual(links[video.track_id], {b"chap": (chapter_track,)})
        # a reference to a track the answer leaves out is dropped, and an empty tref with it
        self.assertEqual(video.references_box(frozenset({video.track_id})), b"")
        self.assertEqual(video.references_box(frozenset({video.track_id, chapter_track})),
                         _box(b"tref", _box(b"chap", struct.pack(">I", chapter_track))))

    def test_timed_track_past_its_end_is_left_out(self) -> None:
        out, _ = self.serve("subs.mp4", 11.6, exact=True)  # the subtitles end at 11.5
        self.assertEqual(decode_errors(out), "")
        self.assertEqual(set(streams(out)), {"video", "audio", "data"})
        links = track_links(out.read_bytes())
        self.assertTrue(all(set(ids) <= set(links) for refs in links.values() for ids in refs.values()))

    def test_chapter_samples_far_from_the_cut_are_a_span_of_their_own(self) -> None:
        """ffmpeg writes the chapter titles at the start of the mdat: the bytes between are not sent."""
        source = load("subs.mp4")
        out, plan = self.serve("subs.mp4", 9.0)
        spans = [span for span in plan.spans() if not source.moov_offset <= span.offset < source.moov_offset + len(source.moov)]
        self.assertEqual(len(spans), 2)
        self.assertLess(spans[0].offset + spans[0].length, spans[1].offset - 100_000)
        self.assertLess(plan.length, len(source.data) * 0.5)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        start=st.floats(min_value=0, max_value=11.99),
        length=st.one_of(st.none(), st.floats(min_value=0.001, max_value=14)),
        exact=st.booleans(),
    )
    def test_any_cut_keeps_timed_tracks_consistent(self, start: float, length: float | None, exact: bool) -> None:
        source = load("subs.mp4")
        index = source.index()
        end = None if length is None else start + length
        try:
            plan = plan_for_seek(index, "clip", start, end, exact)
        except SeekOutOfRange:
            return
        self.assertLessEqual(plan.spans_end("clip"), len(source.data))
        body = plan.render(source.read)
        moov_start, moov_end = _moov_of(body)
        again = SeekIndex.from_moov(body[moov_start:moov_end], moov_start, len(body), None)
        links = track_links(body)
        self.assertTrue(all(set(ids) <= set(links) for refs in links.values() for ids in refs.values()))
        # every timed track lasts exactly as long as the answer shows it (its cues trimmed to the window)
        for track in again.tracks:
            if track.timed:
                shown = track.tables.total_duration / track.timescale
                assert_close(self, track.empty / again.movie_timescale + shown, track.presentation_end, 0.002,
                             f"track {track.track_id}")
                self.assertLessEqual(track.presentation_end, again.duration + 0.002)
        assert again.chapters is not None
        starts = [at for at, _ in again.chapters.entries]
        self.assertEqual(starts[0], 0)
        self.assertEqual(starts, sorted(starts))
        self.assertLess(starts[-1] / 1e7, again.duration)

    def test_broken_timed_track_is_left_out(self) -> None:
        source = load("subs.mp4")
        moov = bytearray(source.moov)
        stsz = [i for i in range(len(moov)) if moov[i : i + 4] == b"stsz"][2]  # the subtitle track's
        struct.pack_into(">I", moov, stsz + 12, 0x3FFFFFFF)  # its sample count
        index = SeekIndex.from_moov(bytes(moov), source.moov_offset, len(source.data), source.ftyp)
        self.assertEqual({track.kind for track in index.tracks}, {b"vide", b"soun", b"text"})


class LateVideoTests(ServedClipMixin, SynchronousTestCase):
    """late_video.mp4: audio 0-6 s, video 1-6 s (an empty edit of 1 s in front of it)."""

    skip = NO_FFMPEG

    def check_late(self, start: float, end: float, exact: bool) -> None:
        out, _ = self.serve("late_video.mp4", start, end, exact)
        self.assertEqual(decode_errors(out), "")
        info = streams(out)
        # the audio plays from start, the video from where it starts in the source
        assert_close(self, float(info["audio"]["start_time"]), 0.0, 0.001, "audio start")
        assert_close(self, float(info["audio"]["duration"]), end - start, 0.001, "audio duration")
        assert_close(self, float(info["video"]["start_time"]), 1.0 - start, 0.001, "video start")
        assert_close(self, float(info["video"]["duration"]), end - 1.0, 0.001, "video duration")
        self.assertTrue(first_video_packet_flags(out).startswith("K"))
        # AAC decodes in frames of 1024 samples: the last one is decoded whole
        samples = len(pcm(out))
        self.assertTrue(0 <= samples - round((end - start) * 44100) < 1024, samples)

    def test_audio_before_the_video_start_is_kept(self) -> None:
        self.check_late(0.0, 4.0, exact=False)

    def test_audio_before_the_video_start_is_kept_with_exact_seek(self) -> None:
        self.check_late(0.0, 4.0, exact=True)

    def test_start_between_audio_and_video_starts(self) -> None:
        self.check_late(0.5, 4.0, exact=False)
        self.check_late(0.5, 4.0, exact=True)

    def test_start_after_the_video_starts_cuts_at_its_keyframe(self) -> None:
        out, _ = self.serve("late_video.mp4", 3.5)  # video keyframes at 1 s and 3 s
        info = streams(out)
        for kind in ("audio", "video"):
            assert_close(self, float(info[kind]["start_time"]), 0.0, 0.001, f"{kind} start")
            assert_close(self, float(info[kind]["duration"]), 3.0, 0.001, f"{kind} duration")


class KeyframeSnapTests(ServedClipMixin, SynchronousTestCase):
    """vfr.mp4: 25, 60 then 12 fps, keyframes at 0, 3, 5 and 7.3333... s (ticks of 1/600 s)."""

    skip = NO_FFMPEG

    def first_frame(self, start: float, exact: bool = False) -> tuple[float, int]:
        """(video duration of the answer, frames it decodes) for a seek to C{start}."""
        out, _ = self.serve("vfr.mp4", start, None, exact)
        self.assertEqual(decode_errors(out, *VFR_DECODE), "")
        self.assertTrue(first_video_packet_flags(out).startswith("K"))
        return float(streams(out)["video"]["duration"]), len(frame_hashes(out))

    def test_source_keyframes(self) -> None:
        video = load("vfr.mp4").index().video
        assert video is not None and video.tables.stss is not None
        times = [video.shown_at(sample - 1, 600) for sample in video.tables.stss]
        self.assertEqual([round(t * 600) for t in times], [0, 1800, 3000, 4400])

    def test_start_a_hair_below_a_keyframe_starts_at_it(self) -> None:
        original = frame_hashes(load("vfr.mp4").path)
        video = load("vfr.mp4").index().video
        assert video is not None
        end = video.presentation_end
        after_keyframe = len(original) - 20  # 20 frames of 1/12 s from 7.3333 s on
        for start in (7.333333, 7.3333, 7.33, 7.30):  # within half a 1/12 s frame
            duration, frames = self.first_frame(start)
            assert_close(self, duration, end - 4400 / 600, 0.001, f"start={start}")
            self.assertEqual(frames, len(original) - after_keyframe, f"start={start}")

    def test_start_further_below_a_keyframe_goes_back_a_gop(self) -> None:
        video = load("vfr.mp4").index().video
        assert video is not None
        duration, _ = self.first_frame(7.28)  # more than half a frame (0.0417 s) before 7.3333
        assert_close(self, duration, video.presentation_end - 5.0, 0.001, "start=7.28")

    def test_tolerance_is_half_the_keyframes_frame(self) -> None:
        video = load("vfr.mp4").index().video
        assert video is not None
        # the keyframe at 3 s starts the 60 fps part: half a frame is 1/120 s
        assert_close(self, self.first_frame(2.992)[0], video.presentation_end - 3.0, 0.001, "start=2.992")
        assert_close(self, self.first_frame(2.99)[0], video.presentation_end, 0.001, "start=2.99")

    def test_exact_seek_a_hair_below_a_keyframe_starts_at_it(self) -> None:
        video = load("vfr.mp4").index().video
        assert video is not None
        duration, _ = self.first_frame(7.333333, exact=True)
        assert_close(self, duration, video.presentation_end - 4400 / 600, 0.001, "exact start=7.333333")


class EndOnBFramesTests(ServedClipMixin, SynchronousTestCase):
    """bframes.mp4 (25 fps, keyframes every 1.92 s): what an C{end} keeps and what players show."""

    skip = NO_FFMPEG

    def probe(self, out: Path) -> dict[str, dict]:
        info = ffprobe_json(out, "-count_frames", "-count_packets", "-show_entries",
                            "stream=codec_type,duration,nb_read_frames,nb_read_packets:format=duration")
        found = {stream["codec_type"]: stream for stream in info["streams"]}
        found["format"] = info["format"]
        return found

    def test_references_past_end_are_hidden_and_the_duration_is_whole_frames(self) -> None:
        for start, end, frames in [(0.5, 1.553, 39), (5.0, 8.01, 105), (10.0, 11.1, 38), (5.0, 8.0, 104)]:
            out, _ = self.serve("bframes.mp4", start, end)
            self.assertEqual(decode_errors(out), "")
            info = self.probe(out)
            video = info["video"]
            # frames shown from the keyframe at or before start to the last one shown before end
            self.assertEqual(int(video["nb_read_frames"]), frames, f"{start}-{end}")
            self.assertEqual(len(frame_hashes(out)), frames, f"{start}-{end}")
            # decoded-order references shown after end are in the file, hidden by the edit list
            self.assertGreater(int(video["nb_read_packets"]), frames, f"{start}-{end}")
            for what in (float(video["duration"]), float(info["format"]["duration"])):
                assert_close(self, what, frames * FRAME, 0.0005, f"{start}-{end} duration")
            assert_close(self, float(info["audio"]["duration"]), frames * FRAME, 0.0005, f"{start}-{end} audio")

    def test_frames_shown_are_the_originals_before_end(self) -> None:
        original = frame_hashes(load("bframes.mp4").path)
        out, _ = self.serve("bframes.mp4", 8.0, 9.03)  # keyframe at 7.68; frames up to the one at 9.00
        self.assertEqual(frame_hashes(out), original[round(7.68 * 25) : round(9.04 * 25)])

    def test_exact_seek_ends_at_a_frame_boundary_too(self) -> None:
        out, _ = self.serve("bframes.mp4", 0.5, 1.553, exact=True)
        info = self.probe(out)
        assert_close(self, float(info["video"]["duration"]), 1.56 - 0.5, 0.0005, "video duration")
        assert_close(self, float(info["format"]["duration"]), 1.56 - 0.5, 0.0005, "duration")


class SeekIndexCacheTests(SynchronousTestCase):
    skip = NO_FFMPEG

    def test_lru_within_byte_budget(self) -> None:
        index = load("audio_only.mp4").index()
        cache = SeekIndexCache(max_bytes=index.memory_size * 2)
        cache.put("a", index)
        cache.put("b", index)
        self.assertIs(cache.get("a"), index)  # a is now the most recent
        cache.put("c", index)
        self.assertEqual(len(cache), 2)
        self.assertIsNone(cache.get("b"))
        self.assertIs(cache.get("a"), index)
        self.assertIs(cache.get("c"), index)

    def test_index_larger_than_budget_is_not_kept(self) -> None:
        index = load("audio_only.mp4").index()
        cache = SeekIndexCache(max_bytes=index.memory_size - 1)
        cache.put("a", index)
        self.assertEqual(len(cache), 0)
        self.assertIsNone(cache.get("a"))


class PerformanceTests(SynchronousTestCase):
    """Generous bounds: the point is to catch per-sample Python loops, not to benchmark."""

    skip = NO_FFMPEG

    def test_long_clip_index_and_seek_are_fast(self) -> None:
        source = load("long_big_moov.mp4")
        started = time.perf_counter()
        index = source.index()
        built = time.perf_counter() - started
        started = time.perf_counter()
        for start in (0.0, 300.0, 600.0, 900.0, 1199.0):
            plan_for_seek(index, "clip", start, None)
        per_seek = (time.perf_counter() - started) / 5
        self.assertLess(built, 0.2)
        self.assertLess(per_seek, 0.02)
        if os.environ.get("H264EDGE_PRINT_TIMES"):
            print(f"\nlong clip: index {built * 1e3:.1f} ms, seek {per_seek * 1e3:.2f} ms, "
                  f"moov {len(source.moov)} bytes, index memory {index.memory_size}")
