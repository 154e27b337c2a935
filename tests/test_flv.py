"""
Tests for L{h264edge.flv}: FLV pseudo-streaming seeks, checked against real ffmpeg output.
"""

from __future__ import annotations

import functools
import struct

import attrs
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from h264edge.flv import (
    CHECK_TAG_READ,
    FLV_HEAD_READ,
    BadFLVOffset,
    FLVError,
    FLVHeadTooShort,
    FLVIndex,
    MalformedFLV,
    check_tag_at,
    is_known_keyframe,
    parse_flv_head,
    plan_for_flv_seek,
)
from h264edge.plan import Literal, Plan, Span
from tests.media import clip, decode_errors, ffprobe_json, have_ffmpeg

SPARK_MP3_RECIPE = [
    "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25",
    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
    "-t", "6", "-c:v", "flv", "-g", "25", "-c:a", "libmp3lame", "-b:a", "64k",
    "-f", "flv", "-flvflags", "add_keyframe_index",
]  # fmt: skip


def _require_ffmpeg(case: SynchronousTestCase) -> None:
    if not have_ffmpeg():
        case.skipTest("ffmpeg/ffprobe are not installed")


def _index_of(data: bytes) -> FLVIndex:
    return parse_flv_head(data[:FLV_HEAD_READ], len(data))


def _render(plan: Plan, data: bytes) -> bytes:
    return plan.render(lambda key, offset, length: data[offset : offset + length])


def _tag_starts(data: bytes, first: int = 13) -> list[int]:
    """Every tag offset of a well-formed FLV file, found by walking the data sizes."""
    starts = []
    offset = first
    while offset + 11 <= len(data):
        starts.append(offset)
        offset += 11 + int.from_bytes(data[offset + 1 : offset + 4], "big") + 4
    return starts


def _tags(stream: bytes, first: int = 13) -> list[tuple[int, int, bytes, int]]:
    """(type, timestamp, body, PreviousTagSize) for each tag of C{stream}."""
    out = []
    for offset in _tag_starts(stream, first):
        size = int.from_bytes(stream[offset + 1 : offset + 4], "big")
        timestamp = int.from_bytes(stream[offset + 4 : offset + 7], "big") | stream[offset + 7] << 24
        body = stream[offset + 11 : offset + 11 + size]
        previous = int.from_bytes(stream[offset + 11 + size : offset + 15 + size], "big")
        out.append((stream[offset], timestamp, body, previous))
    return out


# -- building small synthetic files -------------------------------------------------------------

FLV_HEADER = b"FLV\x01\x05" + (9).to_bytes(4, "big") + bytes(4)


def _tag(tag_type: int, body: bytes, timestamp: int = 0) -> bytes:
    header = (
        bytes([tag_type])
        + len(body).to_bytes(3, "big")
        + (timestamp & 0xFFFFFF).to_bytes(3, "big")
        + bytes([timestamp >> 24 & 0xFF])
        + bytes(3)
    )
    return header + body + (11 + len(body)).to_bytes(4, "big")


def _amf_string(text: str) -> bytes:
    raw = text.encode()
    return b"\x02" + len(raw).to_bytes(2, "big") + raw


def _amf_number(value: float) -> bytes:
    return b"\x00" + struct.pack(">d", value)


def _amf_ecma(properties: dict[str, bytes]) -> bytes:
    out = b"\x08" + len(properties).to_bytes(4, "big")
    for key, value in properties.items():
        out += len(key).to_bytes(2, "big") + key.encode() + value
    return out + b"\x00\x00\x09"


def _on_metadata(properties: dict[str, bytes]) -> bytes:
    return _tag(18, _amf_string("onMetaData") + _amf_ecma(properties))


AVC_SEQUENCE = _tag(9, b"\x17\x00\x00\x00\x00\x01\x64\x00\x0d\xff")
AAC_SEQUENCE = _tag(8, b"\xaf\x00\x12\x10")
AVC_KEYFRAME = _tag(9, b"\x17\x01\x00\x00\x00" + bytes(20), timestamp=40)


def _synthetic(*tags: bytes) -> bytes:
    return FLV_HEADER + b"".join(tags)


class FLVIndexTests(SynchronousTestCase):
    """What L{parse_flv_head} finds in a real ffmpeg H.264/AAC FLV."""

    def setUp(self) -> None:
        _require_ffmpeg(self)
        self.data = clip("av.flv").read_bytes()
        self.index = _index_of(self.data)

    def test_keyframe_positions_are_video_keyframe_tag_starts(self) -> None:
        positions = self.index.keyframe_positions
        self.assertGreater(len(positions), 5)
        self.assertEqual(list(positions), sorted(set(positions)))
        starts = set(_tag_starts(self.data))
        for position in positions:
            self.assertIn(position, starts)
            self.assertEqual(self.data[position], 9)
            self.assertEqual(self.data[position + 11] >> 4, 1, "frame type is keyframe")

    def test_header_is_thirteen_bytes_with_previous_tag_size_zero(self) -> None:
        self.assertEqual(self.index.header, self.data[:13])
        self.assertEqual(self.index.first_tag_offset, 13)
        self.assertEqual(self.index.size, len(self.data))

    def test_prelude_holds_metadata_and_both_sequence_headers_at_time_zero(self) -> None:
        prelude = self.index.prelude
        self.assertTrue(prelude.startswith(self.index.header))
        tags = _tags(prelude)
        self.assertEqual([tag_type for tag_type, _, _, _ in tags], [18, 9, 8])
        self.assertEqual([timestamp for _, timestamp, _, _ in tags], [0, 0, 0])
        self.assertEqual([previous for _, _, body, previous in tags], [11 + len(body) for _, _, body, _ in tags])
        metadata, avc, aac = (body for _, _, body, _ in tags)
        self.assertIn(b"onMetaData", metadata[:16])
        self.assertEqual(avc[:2], b"\x17\x00")
        self.assertEqual(aac[:2], b"\xaf\x00")
        self.assertEqual(len(prelude), 13 + sum(15 + len(body) for _, _, body, _ in tags))

    def test_memory_size_counts_the_prelude(self) -> None:
        self.assertGreater(self.index.memory_size, len(self.index.prelude))

    def test_is_known_keyframe(self) -> None:
        for position in self.index.keyframe_positions:
            self.assertTrue(is_known_keyframe(self.index, position))
        self.assertFalse(is_known_keyframe(self.index, self.index.keyframe_positions[1] + 1))
        self.assertFalse(is_known_keyframe(self.index, 0))
        self.assertFalse(is_known_keyframe(self.index, self.index.size + 10))


class FLVSeekPlanTests(SynchronousTestCase):
    """The plans L{plan_for_flv_seek} makes, as parts."""

    def setUp(self) -> None:
        _require_ffmpeg(self)
        self.data = clip("av.flv").read_bytes()
        self.index = _index_of(self.data)

    def test_seek_is_prelude_then_rest_of_file(self) -> None:
        position = self.index.keyframe_positions[3]
        plan = plan_for_flv_seek(self.index, "k", position)
        self.assertEqual(
            plan.parts, (Literal(self.index.prelude), Span("k", position, len(self.data) - position))
        )
        self.assertEqual(plan.length, len(self.index.prelude) + len(self.data) - position)

    def test_offset_zero_is_the_whole_file(self) -> None:
        self.assertEqual(plan_for_flv_seek(self.index, "k", 0), Plan.whole("k", len(self.data)))

    def test_offsets_at_or_past_the_end_are_rejected(self) -> None:
        for offset in (len(self.data), len(self.data) + 1, 10**12):
            self.assertRaises(BadFLVOffset, plan_for_flv_seek, self.index, "k", offset)

    def test_offsets_inside_the_header_are_rejected(self) -> None:
        for offset in (-1, 1, 9, 12):
            self.assertRaises(BadFLVOffset, plan_for_flv_seek, self.index, "k", offset)

    def test_first_tag_offset_is_allowed(self) -> None:
        plan = plan_for_flv_seek(self.index, "k", 13)
        self.assertEqual(plan.length, len(self.index.prelude) + len(self.data) - 13)


def _video_keyframe_tags(data: bytes) -> set[int]:
    """The offsets of the video tags holding an H.264 keyframe picture (not a sequence header)."""
    return {
        offset for offset in _tag_starts(data)
        if data[offset] == 9 and data[offset + 11] >> 4 == 1 and data[offset + 12] == 1
    }


class CheckTagAtTests(SynchronousTestCase):
    """L{check_tag_at} tells tag boundaries from other offsets, and in H.264 files video keyframe tags."""

    def setUp(self) -> None:
        _require_ffmpeg(self)
        self.data = clip("av.flv").read_bytes()
        self.index = _index_of(self.data)
        # the same file as if its video were not H.264: any tag boundary is a start
        self.any_tag = attrs.evolve(self.index, h264=False)

    def _check(self, offset: int, index: FLVIndex | None = None) -> None:
        check_tag_at(index or self.index, offset, self.data[offset - 4 : offset - 4 + CHECK_TAG_READ])

    def test_every_tag_start_is_a_boundary(self) -> None:
        for offset in _tag_starts(self.data):
            self._check(offset, self.any_tag)

    def test_only_tag_starts_are_boundaries_in_the_first_bytes(self) -> None:
        starts = set(_tag_starts(self.data))
        accepted = set()
        for offset in range(13, FLV_HEAD_READ):
            try:
                self._check(offset, self.any_tag)
            except BadFLVOffset:
                continue
            accepted.add(offset)
        self.assertEqual(accepted, {start for start in starts if start < FLV_HEAD_READ})

    def test_h264_file_accepts_exactly_its_video_keyframe_tags(self) -> None:
        self.assertTrue(self.index.h264)
        accepted = set()
        for offset in _tag_starts(self.data):
            try:
                self._check(offset)
            except BadFLVOffset as e:
                self.assertIn("not a video keyframe", str(e))
                continue
            accepted.add(offset)
        keyframes = _video_keyframe_tags(self.data)
        self.assertEqual(accepted, keyframes)
        self.assertEqual(accepted, set(self.index.keyframe_positions))
        self.assertGreater(len(_tag_starts(self.data)), 2 * len(accepted))

    def test_offset_inside_a_keyframe_is_rejected(self) -> None:
        position = self.index.keyframe_positions[2]
        for offset in (position + 1, position + 4, position + 11, position + 100):
            self.assertRaises(BadFLVOffset, self._check, offset)
            self.assertRaises(BadFLVOffset, self._check, offset, self.any_tag)

    def test_offset_past_the_end_is_rejected(self) -> None:
        size = len(self.data)
        self.assertRaises(BadFLVOffset, check_tag_at, self.index, size, self.data[-4:] + bytes(13))
        self.assertRaises(BadFLVOffset, check_tag_at, self.index, size + 100, bytes(17))

    def test_short_data_is_rejected(self) -> None:
        position = self.index.keyframe_positions[2]
        self.assertRaises(BadFLVOffset, check_tag_at, self.index, position, self.data[position - 4 : position + 10])
        self.assertRaises(BadFLVOffset, check_tag_at, self.index, position, self.data[position - 4 : position + 12])


def _write(directory: str, name: str, data: bytes) -> Path:
    path = Path(directory) / name
    path.write_bytes(data)
    return path


def _first_packets(path: Path) -> list[dict]:
    packets: list[dict] = ffprobe_json(path, "-show_packets", "-read_intervals", "%+#8")["packets"]
    return packets


class FLVSeekDecodeTests(SynchronousTestCase):
    """Seek answers for an H.264/AAC file decode on their own with ffmpeg."""

    def setUp(self) -> None:
        _require_ffmpeg(self)
        self.data = clip("av.flv").read_bytes()
        self.index = _index_of(self.data)
        self.directory = tempfile.mkdtemp()
        positions = self.index.keyframe_positions
        self.positions = [positions[1], positions[len(positions) // 2], positions[-1]]

    def tearDown(self) -> None:
        for path in Path(self.directory).iterdir():
            path.unlink()
        Path(self.directory).rmdir()

    def _seek_file(self, position: int) -> Path:
        answer = _render(plan_for_flv_seek(self.index, "av.flv", position), self.data)
        return _write(self.directory, f"seek-{position}.flv", answer)

    def test_seek_answers_decode_without_errors(self) -> None:
        for position in self.positions:
            self.assertEqual(decode_errors(self._seek_file(position)), "", f"seek to {position}")

    def test_seek_answers_start_with_a_keyframe_and_have_both_streams(self) -> None:
        for position in self.positions:
            path = self._seek_file(position)
            streams = ffprobe_json(path, "-show_streams")["streams"]
            self.assertEqual(
                sorted((s["codec_type"], s["codec_name"]) for s in streams), [("audio", "aac"), ("video", "h264")]
            )
            video = [p for p in _first_packets(path) if p["codec_type"] == "video"]
            self.assertTrue(video[0]["flags"].startswith("K"), f"seek to {position}: {video[0]}")

    def test_seek_answers_start_at_the_requested_frame(self) -> None:
        original = _write(self.directory, "original.flv", self.data)
        timestamp_at = {
            int(p["pos"]): p["pts"]
            for p in ffprobe_json(original, "-show_packets", "-select_streams", "v")["packets"]
        }
        for position in self.positions:
            video = [p for p in _first_packets(self._seek_file(position)) if p["codec_type"] == "video"]
            self.assertEqual(video[0]["pts"], timestamp_at[position])

    def test_nginx_style_answer_without_sequence_headers_does_not_decode(self) -> None:
        """
        Why the prelude repeats the sequence headers: nginx's answer (header + file from the offset)
        has no AVC decoder configuration, and ffmpeg cannot decode it.
        """
        position = self.positions[1]
        path = _write(self.directory, "nginx.flv", self.index.header + self.data[position:])
        self.assertNotEqual(decode_errors(path), "")


class NonAVCFLVTests(SynchronousTestCase):
    """Sorenson Spark / MP3 FLV: no sequence headers, so the prelude is the header and metadata."""

    def setUp(self) -> None:
        _require_ffmpeg(self)
        self.data = clip("spark_mp3.flv", SPARK_MP3_RECIPE).read_bytes()
        self.index = _index_of(self.data)

    def test_prelude_is_header_and_metadata(self) -> None:
        tags = _tags(self.index.prelude)
        self.assertEqual([(tag_type, timestamp) for tag_type, timestamp, _, _ in tags], [(18, 0)])
        self.assertEqual(self.index.prelude[:13], self.index.header)

    def test_seek_answer_decodes(self) -> None:
        self.assertGreater(len(self.index.keyframe_positions), 2)
        position = self.index.keyframe_positions[2]
        with tempfile.TemporaryDirectory() as directory:
            answer = _render(plan_for_flv_seek(self.index, "k", position), self.data)
            path = _write(directory, "seek.flv", answer)
            self.assertEqual(decode_errors(path), "")
            video = [p for p in _first_packets(path) if p["codec_type"] == "video"]
            self.assertTrue(video[0]["flags"].startswith("K"))


class SyntheticFLVTests(SynchronousTestCase):
    """L{parse_flv_head} on small hand-made files: what it accepts, what it refuses and why."""

    def test_minimal_file_with_sequence_headers(self) -> None:
        def metadata_for(position: float) -> bytes:
            keyframes = (
                b"\x03\x00\x0dfilepositions\x0a\x00\x00\x00\x02"
                + _amf_number(position)
                + _amf_number(10.0**9)
                + b"\x00\x00\x09"
            )
            return _on_metadata({"duration": _amf_number(1.0), "keyframes": keyframes})

        keyframe_at = 13 + len(metadata_for(0)) + len(AVC_SEQUENCE) + len(AAC_SEQUENCE)
        metadata = metadata_for(keyframe_at)
        data = _synthetic(metadata, AVC_SEQUENCE, AAC_SEQUENCE, AVC_KEYFRAME)
        index = _index_of(data)
        self.assertEqual(index.prelude, FLV_HEADER + metadata + AVC_SEQUENCE + AAC_SEQUENCE)
        self.assertEqual(index.keyframe_positions, (keyframe_at,), "positions outside the file are dropped")

    def test_missing_keyframe_index_gives_no_positions(self) -> None:
        data = _synthetic(_on_metadata({"duration": _amf_number(1.0)}), AVC_SEQUENCE, AVC_KEYFRAME)
        self.assertEqual(_index_of(data).keyframe_positions, ())

    def test_sequence_header_timestamps_are_zeroed(self) -> None:
        late = _tag(9, b"\x17\x00\x00\x00\x00\x01", timestamp=0x01234567)
        index = _index_of(_synthetic(late, AVC_KEYFRAME))
        self.assertEqual(index.prelude, FLV_HEADER + _tag(9, b"\x17\x00\x00\x00\x00\x01"))

    def test_sequence_headers_after_the_first_frame_are_not_collected(self) -> None:
        index = _index_of(_synthetic(AVC_SEQUENCE, AVC_KEYFRAME, AAC_SEQUENCE))
        self.assertEqual(index.prelude, FLV_HEADER + AVC_SEQUENCE)

    def test_file_without_metadata(self) -> None:
        index = _index_of(_synthetic(AVC_SEQUENCE, AAC_SEQUENCE, AVC_KEYFRAME))
        self.assertEqual(index.prelude, FLV_HEADER + AVC_SEQUENCE + AAC_SEQUENCE)

    def test_sequence_header_beyond_the_head_is_refused_with_the_size_needed(self) -> None:
        # a cue-point tag that pushes the AVC sequence header across byte 65536
        padding = _tag(18, _amf_string("onCuePoint") + b"\x0c" + (65474).to_bytes(4, "big") + b"x" * 65474)
        self.assertEqual(13 + len(padding), FLV_HEAD_READ - 16)
        data = _synthetic(padding, AVC_SEQUENCE, AVC_KEYFRAME)
        error = self.assertRaises(FLVHeadTooShort, _index_of, data)
        self.assertIsInstance(error, MalformedFLV)
        self.assertEqual(error.needed, 13 + len(padding) + len(AVC_SEQUENCE))
        self.assertIn("beyond the 65536 bytes", str(error))
        index = parse_flv_head(data[: error.needed + 13], len(data))
        self.assertEqual(index.prelude, FLV_HEADER + AVC_SEQUENCE)

    def test_refused_inputs(self) -> None:
        good = _synthetic(AVC_SEQUENCE, AVC_KEYFRAME)
        cases = {
            "empty": (b"", 0),
            "short": (good[:12], 12),
            "no signature": (b"FLX" + good[3:], len(good)),
            "version 2": (good[:3] + b"\x02" + good[4:], len(good)),
            "data offset too small": (good[:5] + (8).to_bytes(4, "big") + good[9:], len(good)),
            "data offset past head": (good[:5] + (10**6).to_bytes(4, "big") + good[9:], len(good)),
            "head longer than file": (good, len(good) - 1),
            "unknown tag type": (good[:13] + b"\x07" + good[14:], len(good)),
            "tag past end of file": (good[:-5], len(good) - 5),
            "truncated header": (good[:20], 20),
            "lying previous tag size": (good[:13] + AVC_SEQUENCE[:-1] + b"\x99" + AVC_KEYFRAME, len(good)),
            "random bytes": (bytes(range(256)) * 4, 1024),
        }
        for name, (head, size) in cases.items():
            try:
                parse_flv_head(head, size)
            except MalformedFLV:
                continue
            self.fail(f"accepted: {name}")

    def test_strict_amf0(self) -> None:
        cases = {
            "unknown marker": _amf_string("onMetaData") + b"\x11\x00",
            "string past end": _amf_string("onMetaData") + b"\x02\x00\xff" + b"x",
            "huge strict array": _amf_string("onMetaData") + b"\x0a\xff\xff\xff\xff" + _amf_number(1.0),
            "deep nesting": _amf_string("onMetaData") + b"\x0a\x00\x00\x00\x01" * 100 + _amf_number(1.0),
            "bad object end": _amf_string("onMetaData") + b"\x03\x00\x00\x05",
            "name not a string": _amf_number(1.0),
        }
        for name, body in cases.items():
            try:
                _index_of(_synthetic(_tag(18, body), AVC_SEQUENCE, AVC_KEYFRAME))
            except MalformedFLV:
                continue
            self.fail(f"accepted: {name}")

    def test_ecma_array_may_end_with_the_tag(self) -> None:
        body = _amf_string("onMetaData") + _amf_ecma({"duration": _amf_number(2.0)})[:-3]
        index = _index_of(_synthetic(_tag(18, body), AVC_SEQUENCE, AVC_KEYFRAME))
        self.assertEqual(index.prelude, FLV_HEADER + _tag(18, body) + AVC_SEQUENCE)


@functools.cache
def _real_head() -> bytes:
    if have_ffmpeg():
        return clip("av.flv").read_bytes()[:4096]
    return _synthetic(_on_metadata({"duration": _amf_number(1.0)}), AVC_SEQUENCE, AAC_SEQUENCE, AVC_KEYFRAME)


@st.composite
def _mutated_heads(draw: st.DrawFn) -> tuple[bytes, int]:
    head = bytearray(_real_head())
    for _ in range(draw(st.integers(0, 8))):
        at = draw(st.integers(0, len(head) - 1))
        head[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        start = draw(st.integers(0, len(head)))
        head[start : start + draw(st.integers(0, 64))] = draw(st.binary(max_size=64))
    head = head[: draw(st.integers(0, len(head)))]
    size = len(head) + draw(st.sampled_from([0, 1, 100, 10**6, 2**40]))
    return bytes(head), size


class FuzzTests(SynchronousTestCase):
    """Whatever bytes arrive, L{parse_flv_head} answers an index or an L{FLVError}."""

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_mutated_heads())
    def test_mutated_heads_raise_only_flv_errors(self, case: tuple[bytes, int]) -> None:
        head, size = case
        try:
            index = parse_flv_head(head, size)
        except FLVError:
            return
        self.assertTrue(index.prelude.startswith(index.header))
        for position in index.keyframe_positions:
            self.assertTrue(index.first_tag_offset <= position < size)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=512), st.integers(0, 2**40))
    def test_random_bytes_raise_only_flv_errors(self, head: bytes, extra: int) -> None:
        try:
            parse_flv_head(b"FLV\x01\x05\x00\x00\x00\x09" + head, 9 + len(head) + extra)
        except FLVError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=0, max_size=CHECK_TAG_READ), st.integers(-10, 10**7), st.booleans())
    def test_check_tag_at_raises_only_bad_offset(self, data: bytes, offset: int, h264: bool) -> None:
        index = _index_of(_synthetic(AVC_SEQUENCE, AVC_KEYFRAME))
        index = FLVIndex(index.size + 10**6, index.header, index.prelude, index.first_tag_offset, (), 0, h264)
        try:
            check_tag_at(index, offset, data)
        except BadFLVOffset:
            pass
