"""
MP4 and FLV pseudo-streaming through the edge, end to end: a real origin, a real store, real sockets,
and the answers checked with ffmpeg/ffprobe.

The container layers are unit-tested in tests.test_mp4 and tests.test_flv; these tests check what the
web layer adds on top: fetching the container head from the origin (moov after the mdat included),
caching, status codes, ETags, Range over a rewritten answer and single-flight parsing.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import random
import shutil
import struct
import subprocess
import tempfile
from bisect import bisect_right
from pathlib import Path
from typing import Any, Optional

from attrs import frozen
from twisted.internet import defer, reactor

from h264edge import flv
from tests.edgekit import SLICE, EdgeTestCase, header
from tests.media import (
    VFR_DECODE,
    clip,
    decode_errors,
    ffprobe_json,
    have_ffmpeg,
    late_video_clip,
    subtitles_clip,
    top_level_boxes,
)
from tests.test_mp4 import chapters, subtitles, track_links

NO_FFMPEG = None if have_ffmpeg() else "ffmpeg and ffprobe are needed (apt-get install -y ffmpeg)"
FRAME = 0.04  # one video frame at 25 fps; AAC frames (1024 / 44100 s) are shorter
REQUEST_TIMEOUT = 30.0


# -- facts about the original clips, probed once per run ---------------------------------------------


@frozen
class Original:
    """A test clip as the origin holds it, with what ffprobe says about it."""

    path: Path
    data: bytes
    durations: dict[str, float]  # codec_type -> stream duration, s
    keyframes: tuple[float, ...]  # presentation times of the video keyframes, s (empty: no video)
    boxes: tuple[tuple[bytes, int, int], ...]  # top-level (type, offset, size)

    @property
    def duration(self) -> float:
        return max(self.durations.values())

    def box(self, box_type: bytes) -> tuple[int, int]:
        for found, offset, size in self.boxes:
            if found == box_type:
                return offset, size
        raise KeyError(box_type)

    def keyframe_at_or_before(self, start: float) -> float:
        """The time the edge cuts at: the last keyframe at or before C{start} (C{start} with no video)."""
        if not self.keyframes:
            return start
        return self.keyframes[max(0, bisect_right(self.keyframes, start + 1e-6) - 1)]


_originals: dict[str, Original] = {}
BUILT = {"subs.mp4": subtitles_clip, "late_video.mp4": late_video_clip}  # clips made in several steps


def original(name: str) -> Original:
    if name not in _originals:
        path = BUILT[name]() if name in BUILT else clip(name)
        info = ffprobe_json(path, "-show_entries", "stream=codec_type,duration:format=duration")
        # FLV streams carry no duration of their own: use the file's
        durations = {
            s["codec_type"]: float(s.get("duration", info["format"]["duration"])) for s in info["streams"]
        }
        keyframes: tuple[float, ...] = ()
        if "video" in durations:
            packets = ffprobe_json(path, "-select_streams", "v:0", "-show_entries", "packet=pts_time,flags")
            keyframes = tuple(
                sorted(float(p["pts_time"]) for p in packets["packets"] if p["flags"].startswith("K"))
            )
        _originals[name] = Original(path, path.read_bytes(), durations, keyframes, tuple(top_level_boxes(path)))
    return _originals[name]


_video_packet_offsets: dict[str, list[tuple[float, int]]] = {}


def video_packet_offsets(name: str) -> list[tuple[float, int]]:
    """(pts_time, byte offset) of every video packet of clip C{name}, sorted by time."""
    if name not in _video_packet_offsets:
        packets = ffprobe_json(clip(name), "-select_streams", "v:0", "-show_entries", "packet=pts_time,pos")
        _video_packet_offsets[name] = sorted((float(p["pts_time"]), int(p["pos"])) for p in packets["packets"])
    return _video_packet_offsets[name]


# -- what a served answer decodes to ------------------------------------------------------------------


@frozen
class Decoded:
    """What the decoders make of one answer body."""

    errors: str  # "" when ffmpeg decodes every stream cleanly
    streams: dict[str, dict[str, Any]]  # codec_type -> ffprobe stream entry
    format_duration: float
    first_video_flags: Optional[str]
    first_video_time: Optional[float]
    boxes: tuple[bytes, ...]


_decoded: dict[str, Decoded] = {}


def _scratch() -> Path:
    """A directory for answers being probed; each file is removed once probed."""
    global _scratch_dir
    if _scratch_dir is None:
        _scratch_dir = Path(tempfile.mkdtemp(prefix="h264edge-seek-edge-"))
        atexit.register(shutil.rmtree, _scratch_dir, True)
    return _scratch_dir


_scratch_dir: Optional[Path] = None


def decode(body: bytes, suffix: str = ".mp4", *, decode_seconds: Optional[float] = None) -> Decoded:
    """Probe and decode an answer; the same bytes are only decoded once per run."""
    digest = hashlib.sha256(body).hexdigest()
    key = f"{digest}:{decode_seconds}"
    if key in _decoded:
        return _decoded[key]
    path = _scratch() / (digest[:20] + suffix)
    path.write_bytes(body)
    try:
        if decode_seconds is None:
            errors = decode_errors(path)
        else:
            errors = _decode_errors_for(path, decode_seconds)
        info = ffprobe_json(
            path, "-count_packets", "-show_entries", "stream=codec_type,start_time,duration,nb_read_packets"
            ":format=duration",
        )
        streams = {s["codec_type"]: s for s in info["streams"]}
        flags, time = None, None
        if "video" in streams:
            packets = ffprobe_json(
                path, "-select_streams", "v:0", "-show_packets", "-read_intervals", "%+#1",
                "-show_entries", "packet=flags,pts_time",
            )
            flags, time = str(packets["packets"][0]["flags"]), float(packets["packets"][0]["pts_time"])
        boxes = tuple(box[0] for box in top_level_boxes(path)) if suffix == ".mp4" else ()
    finally:
        path.unlink()
    result = _decoded[key] = Decoded(errors, streams, float(info["format"]["duration"]), flags, time, boxes)
    return result


def _decode_errors_for(path: Path, seconds: float) -> str:
    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-xerror", "-i", str(path), "-t", str(seconds), "-f", "null", "-"],
        capture_output=True,
        text=True,
    )
    return (result.stderr.strip() + (f"\nexit {result.returncode}" if result.returncode else "")).strip()


# -- the test case ------------------------------------------------------------------------------------


class SeekEdgeTestCase(EdgeTestCase):
    skip = NO_FFMPEG

    def put(self, name: str, path: Optional[str] = None, data: Optional[bytes] = None) -> str:
        """Give the origin clip C{name} (or C{data}) at C{path}; returns the path."""
        path = path or "/v/" + name
        content_type = "video/x-flv" if name.endswith(".flv") else "video/mp4"
        self.origin.add(path, original(name).data if data is None else data, content_type=content_type)
        return path

    async def fetch(self, path: str, headers: Optional[dict[str, str]] = None, method: str = "GET") -> tuple[Any, bytes]:
        """L{get}, but a hung answer fails the test instead of hanging it."""
        d = defer.Deferred.fromCoroutine(self.get(path, headers, method))
        d.addTimeout(REQUEST_TIMEOUT, reactor)
        result: tuple[Any, bytes] = await d
        return result

    def assert_close(self, actual: float, expected: float, tolerance: float, what: str) -> None:
        # trial's assertAlmostEqual has no delta=
        if not abs(actual - expected) <= tolerance:
            self.fail(f"{what}: {actual} is not within {tolerance} of {expected}")

    def assert_plain_error(self, response: Any, body: bytes, codes: tuple[int, ...]) -> None:
        self.assertIn(response.code, codes, body)
        self.assertEqual(header(response, "Content-Type"), "text/plain; charset=utf-8")
        self.assertTrue(body.endswith(b"\n") and len(body) < 1000, body)
        self.assertNotIn(b"Traceback", body)

    def check_cut(
        self, name: str, body: bytes, start: float, end: Optional[float] = None,
        decode_seconds: Optional[float] = None,
    ) -> Decoded:
        """
        Check a served seek of clip C{name}: clean decode, moov before mdat, video starts on a keyframe,
        every stream lasts from the keyframe at or before C{start} to C{end} (or its end), within a frame,
        and the streams start together.
        """
        source = original(name)
        cut = source.keyframe_at_or_before(start)
        out = decode(body, decode_seconds=decode_seconds)
        self.assertEqual(out.errors, "", f"{name} start={start} end={end}")
        self.assertLess(out.boxes.index(b"moov"), out.boxes.index(b"mdat"))
        self.assertEqual(set(out.streams), set(source.durations))
        for kind, stream in out.streams.items():
            expected = (source.durations[kind] if end is None else min(end, source.durations[kind])) - cut
            self.assert_close(float(stream["duration"]), expected, FRAME + 0.001, f"{name} {kind} duration")
        starts = [float(stream["start_time"]) for stream in out.streams.values()]
        self.assert_close(max(starts) - min(starts), 0.0, FRAME, f"{name} audio/video start gap")
        if source.keyframes:
            self.assertTrue(out.first_video_flags and out.first_video_flags.startswith("K"), out.first_video_flags)
        return out


class ColdAndCachedSeekTests(SeekEdgeTestCase):
    async def test_cold_seek_into_moov_at_end_clip_decodes_from_keyframe(self) -> None:
        path = self.put("av_moov_end.mp4")
        response, body = await self.fetch(path + "?start=5.3")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, "X-Cache"), "MISS")
        self.assertEqual(header(response, "Content-Type"), "video/mp4")
        self.assertEqual(response.length, len(body))
        self.check_cut("av_moov_end.mp4", body, 5.3)

    async def test_big_moov_indexed_in_a_thread_gives_the_same_answer(self) -> None:
        from h264edge.web import resource

        path = self.put("av_moov_end.mp4")
        _, here = await self.fetch(path + "?start=5.3")
        self.edge.indexes = type(self.edge.indexes)(2**20)  # forget the parsed index
        self.edge.seek_plans = type(self.edge.seek_plans)(2**20)
        threads = []
        real = resource.deferToThreadPool

        def counting(*args: Any, **kwargs: Any) -> Any:
            threads.append(args[2])
            return real(*args, **kwargs)

        self.patch(resource, "THREAD_MOOV_BYTES", 0)
        self.patch(resource, "deferToThreadPool", counting)
        response, threaded = await self.fetch(path + "?start=5.3")
        self.assertEqual(threads, [resource.mp4.SeekIndex.from_moov])
        self.assertEqual((response.code, threaded), (200, here))

    async def test_repeated_seek_is_a_hit_without_origin_requests(self) -> None:
        path = self.put("av_moov_end.mp4")
        _, first = await self.fetch(path + "?start=9.1")
        requests = self.origin.requests
        response, second = await self.fetch(path + "?start=9.1")
        self.assertEqual(header(response, "X-Cache"), "HIT")
        self.assertEqual(self.origin.requests, requests)
        self.assertEqual(second, first)

    async def test_later_seeks_reuse_the_parsed_index(self) -> None:
        from h264edge import mp4

        path = self.put("av_moov_end.mp4")
        parses: list[int] = []
        real = mp4.SeekIndex.from_moov.__func__  # type: ignore[attr-defined]

        def counting(cls: type, *args: object) -> object:
            parses.append(1)
            return real(cls, *args)

        self.patch(mp4.SeekIndex, "from_moov", classmethod(counting))
        for start in ("3.1", "7.9", "12.4"):
            response, _ = await self.fetch(path + "?start=" + start)
            self.assertEqual(response.code, 200)
        self.assertEqual(len(parses), 1)

    async def test_seek_into_cached_clip_is_a_hit(self) -> None:
        path = self.put("av_moov_end.mp4")
        _, whole = await self.fetch(path)
        self.assertEqual(whole, original("av_moov_end.mp4").data)
        requests = self.origin.requests
        response, body = await self.fetch(path + "?start=13.7")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, "X-Cache"), "HIT")
        self.assertEqual(self.origin.requests, requests)
        self.check_cut("av_moov_end.mp4", body, 13.7)

    async def test_end_cuts_the_duration(self) -> None:
        path = self.put("av_moov_end.mp4")
        response, body = await self.fetch(path + "?start=4.5&end=11.2")
        self.assertEqual(response.code, 200)
        self.check_cut("av_moov_end.mp4", body, 4.5, 11.2)

    async def test_end_past_the_duration_is_the_same_as_no_end(self) -> None:
        path = self.put("av_moov_end.mp4")
        _, open_ended = await self.fetch(path + "?start=5")
        for end in ("20", "99999", "1e300", "1e308"):
            response, body = await self.fetch(f"{path}?start=5&end={end}")
            self.assertEqual(response.code, 200, f"end={end}: {body[:200]!r}")
            self.assertTrue(body == open_ended, f"end={end} changed the answer")

    async def test_end_alone_cuts_from_zero(self) -> None:
        path = self.put("av_moov_end.mp4")
        response, body = await self.fetch(path + "?end=6")
        self.assertEqual(response.code, 200)
        self.check_cut("av_moov_end.mp4", body, 0.0, 6.0)


class UnrulyOriginTests(SeekEdgeTestCase):
    async def test_cold_seek_through_an_origin_that_ignores_range(self) -> None:
        path = self.put("av_moov_end.mp4")
        self.origin.ignore_range = True
        response, body = await self.fetch(path + "?start=5.3")
        self.assertEqual(response.code, 200)
        self.check_cut("av_moov_end.mp4", body, 5.3)

    async def test_cold_seek_survives_an_origin_abort_inside_the_moov(self) -> None:
        moov_offset, moov_size = original("av_moov_end.mp4").box(b"moov")
        path = self.put("av_moov_end.mp4")
        # the first slice first: an abort of the very first origin answer is a 502 (nothing to resume)
        await self.fetch(path, {"Range": "bytes=0-99"})
        self.origin.abort_after = moov_offset + moov_size // 2
        self.origin.aborts_left = 1
        response, body = await self.fetch(path + "?start=5.3")
        self.assertEqual(response.code, 200)
        self.check_cut("av_moov_end.mp4", body, 5.3)
        self.assertEqual(self.origin.aborts_left, 0, "the abort did not happen inside the moov fetch")


class WholeFileTests(SeekEdgeTestCase):
    async def test_start_zero_and_no_start_give_the_original_bytes(self) -> None:
        path = self.put("av_moov_end.mp4")
        data = original("av_moov_end.mp4").data
        for query in ("", "?start=0", "?start=0.0", "?start="):
            response, body = await self.fetch(path + query)
            self.assertEqual(response.code, 200, query)
            self.assertTrue(body == data, f"{query!r} did not give the original bytes")
            self.assertEqual(header(response, "ETag"), self.origin.files[path].etag)

    async def test_faststart_clip(self) -> None:
        path = self.put("av_faststart.mp4")
        response, body = await self.fetch(path + "?start=7&end=12.5")
        self.assertEqual(response.code, 200)
        self.check_cut("av_faststart.mp4", body, 7.0, 12.5)
        response, body = await self.fetch(path)
        self.assertTrue(body == original("av_faststart.mp4").data)

    async def test_bframes_clip(self) -> None:
        path = self.put("bframes.mp4")
        response, body = await self.fetch(path + "?start=5.3")
        self.assertEqual(response.code, 200)
        self.check_cut("bframes.mp4", body, 5.3)

    async def test_audio_only_clip(self) -> None:
        path = self.put("audio_only.mp4")
        response, body = await self.fetch(path + "?start=3.3")
        self.assertEqual(response.code, 200)
        out = self.check_cut("audio_only.mp4", body, 3.3)
        self.assertEqual(set(out.streams), {"audio"})

    async def test_video_only_clip(self) -> None:
        path = self.put("video_only.mp4")
        response, body = await self.fetch(path + "?start=19.9")
        self.assertEqual(response.code, 200)
        self.check_cut("video_only.mp4", body, 19.9)


class LongClipTests(SeekEdgeTestCase):
    """long_big_moov.mp4: 1200 s, ~6 MB, a ~770 KB moov after the mdat."""

    name = "long_big_moov.mp4"

    def kept_offset(self, start: float) -> int:
        """Where the kept data starts: the byte offset of the keyframe the edge cuts at."""
        cut = original(self.name).keyframe_at_or_before(start)
        return min(pos for time, pos in video_packet_offsets(self.name) if time >= cut - 1e-6)

    def offset_after(self, end: float) -> int:
        """The byte offset of the first video packet at or after C{end}."""
        return min(pos for time, pos in video_packet_offsets(self.name) if time >= end - 1e-6)

    async def test_cold_seek_fetches_the_moov_and_the_kept_data_only(self) -> None:
        source = original(self.name)
        _, moov_size = source.box(b"moov")
        path = self.put(self.name)
        response, body = await self.fetch(path + "?start=600.5")
        self.assertEqual(response.code, 200)
        first = self.kept_offset(600.5)
        limit = moov_size + (len(source.data) - first) + 4 * SLICE
        self.assertLessEqual(self.origin.bytes_sent, limit)
        self.assertLess(self.origin.bytes_sent, 0.7 * len(source.data))
        # 600 s of 64x36 video: probe it all, decode the first seconds only
        self.check_cut(self.name, body, 600.5, decode_seconds=5)

    async def test_cold_seek_with_end_fetches_less(self) -> None:
        source = original(self.name)
        _, moov_size = source.box(b"moov")
        path = self.put(self.name)
        response, body = await self.fetch(path + "?start=600.5&end=630")
        self.assertEqual(response.code, 200)
        data_length = self.offset_after(630) - self.kept_offset(600.5)
        self.assertLessEqual(self.origin.bytes_sent, moov_size + data_length + 6 * SLICE)
        self.assertLess(self.origin.bytes_sent, 0.25 * len(source.data))
        self.check_cut(self.name, body, 600.5, 630.0)


class RangeOverSeekTests(SeekEdgeTestCase):
    async def test_ranges_are_slices_of_the_rewritten_answer(self) -> None:
        path = self.put("av_moov_end.mp4") + "?start=6.2&end=15"
        _, whole = await self.fetch(path)
        total = len(whole)
        etag = None
        for spec, first, last in [
            ("0-0", 0, 0),
            ("0-99", 0, 99),
            ("100-20000", 100, 20000),
            (f"{total - 1}-", total - 1, total - 1),
            (f"{SLICE - 5}-{3 * SLICE + 5}", SLICE - 5, 3 * SLICE + 5),
            ("-777", total - 777, total - 1),
            (f"5000-{total + 1000}", 5000, total - 1),
        ]:
            response, body = await self.fetch(path, {"Range": "bytes=" + spec})
            self.assertEqual(response.code, 206, spec)
            self.assertEqual(header(response, "Content-Range"), f"bytes {first}-{last}/{total}", spec)
            self.assertTrue(body == whole[first : last + 1], f"bytes={spec} differ from the whole answer")
            etag = etag or header(response, "ETag")
            self.assertEqual(header(response, "ETag"), etag)

    async def test_range_past_the_end_of_the_rewritten_answer_is_416(self) -> None:
        path = self.put("av_moov_end.mp4") + "?start=6.2"
        _, whole = await self.fetch(path)
        response, _ = await self.fetch(path, {"Range": f"bytes={len(whole)}-"})
        self.assertEqual(response.code, 416)
        self.assertEqual(header(response, "Content-Range"), f"bytes */{len(whole)}")

    async def test_cold_range_over_a_seek(self) -> None:
        path = self.put("av_moov_end.mp4") + "?start=8"
        response, part = await self.fetch(path, {"Range": "bytes=30000-99999"})
        self.assertEqual(response.code, 206)
        _, whole = await self.fetch(path)
        self.assertTrue(part == whole[30000:100000])

    async def test_head_of_a_seek_gives_the_get_length(self) -> None:
        path = self.put("av_moov_end.mp4") + "?start=3.3"
        head, nothing = await self.fetch(path, method="HEAD")
        self.assertEqual((head.code, nothing), (200, b""))
        _, body = await self.fetch(path)
        self.assertEqual(header(head, "Content-Length"), str(len(body)))


class SeekETagTests(SeekEdgeTestCase):
    async def test_seek_etag_differs_from_the_file_and_between_starts_and_is_stable(self) -> None:
        path = self.put("av_moov_end.mp4")
        whole, _ = await self.fetch(path)
        a1, _ = await self.fetch(path + "?start=4")
        a2, _ = await self.fetch(path + "?start=4")
        b, _ = await self.fetch(path + "?start=10")
        c, _ = await self.fetch(path + "?start=4&end=9")
        tags = [header(r, "ETag") for r in (whole, a1, a2, b, c)]
        self.assertTrue(all(tag and tag.startswith('"') for tag in tags), tags)
        self.assertEqual(tags[1], tags[2])
        self.assertEqual(len({tags[0], tags[1], tags[3], tags[4]}), 4, tags)

    async def test_seek_etag_changed_with_the_answers_bytes(self) -> None:
        """
        Seek answers keep more tracks and end on frame boundaries since REWRITE_VERSION 2: the same
        request has new bytes, so a new ETag (a client must not join bytes of both with If-Range).
        """
        path = self.put("av_moov_end.mp4")
        response, _ = await self.fetch(path + "?start=5")
        file = self.origin.files[path]
        meta = self.store.get(path)
        assert meta is not None
        basis = f"{file.etag}|{meta.meta.last_modified}|{meta.meta.size}|mp4:5.0:None:False"
        before = '"' + hashlib.sha256(basis.encode()).hexdigest()[:24] + '"'
        self.assertNotEqual(header(response, "ETag"), before)

    async def test_if_none_match_with_the_seek_etag_is_304(self) -> None:
        path = self.put("av_moov_end.mp4") + "?start=4"
        first, _ = await self.fetch(path)
        etag = header(first, "ETag")
        assert etag is not None
        response, body = await self.fetch(path, {"If-None-Match": etag})
        self.assertEqual((response.code, body), (304, b""))
        file_etag = self.origin.files["/v/av_moov_end.mp4"].etag
        assert file_etag is not None
        response, body = await self.fetch(path, {"If-None-Match": file_etag})
        self.assertEqual(response.code, 200)


class SeekValidatorTests(SeekEdgeTestCase):
    async def test_weak_origin_etag_gives_a_weak_seek_etag(self) -> None:
        """
        A weak origin ETag only promises equivalent content, so the rewritten answer cannot promise
        identical bytes: its ETag is weak too, and If-Range (a strong comparison) does not match it.
        """
        self.origin.add("/w.mp4", original("av_moov_end.mp4").data, content_type="video/mp4", etag='W/"v1"')
        response, whole = await self.fetch("/w.mp4?start=5")
        etag = header(response, "ETag")
        assert etag is not None
        self.assertTrue(etag.startswith('W/"'), etag)
        response, body = await self.fetch("/w.mp4?start=5", {"If-None-Match": etag})
        self.assertEqual(response.code, 304)
        response, body = await self.fetch("/w.mp4?start=5", {"Range": "bytes=0-9", "If-Range": etag})
        self.assertTrue((response.code, body) == (200, whole))

    async def test_if_range_with_the_file_etag_does_not_apply_to_a_seek(self) -> None:
        path = self.put("av_moov_end.mp4")
        file_etag = self.origin.files[path].etag
        assert file_etag is not None
        _, whole = await self.fetch(path + "?start=5")
        response, body = await self.fetch(path + "?start=5", {"Range": "bytes=0-9", "If-Range": file_etag})
        self.assertTrue((response.code, body) == (200, whole))

    async def test_changed_origin_file_is_reindexed(self) -> None:
        self.origin.add("/c.mp4", original("av_moov_end.mp4").data, content_type="video/mp4",
                        cache_control="max-age=0")
        response, body = await self.fetch("/c.mp4?start=5.3")
        self.check_cut("av_moov_end.mp4", body, 5.3)
        self.origin.add("/c.mp4", original("bframes.mp4").data, content_type="video/mp4", cache_control="max-age=0")
        response, body = await self.fetch("/c.mp4?start=5.3")
        self.assertEqual(response.code, 200)
        self.check_cut("bframes.mp4", body, 5.3)


class ExactSeekTests(SeekEdgeTestCase):
    async def test_exact_seek_starts_at_start(self) -> None:
        await self._stop_once(self._stop_edge)
        self.start_edge(exact_seek=True)
        path = self.put("bframes.mp4")
        response, body = await self.fetch(path + "?start=5.3&end=15")
        self.assertEqual(response.code, 200)
        out = decode(body)
        self.assertEqual(out.errors, "")
        for kind, stream in out.streams.items():
            self.assert_close(float(stream["duration"]), 15 - 5.3, FRAME + 0.001, f"{kind} duration")


class BadSeekTests(SeekEdgeTestCase):
    async def test_bad_parameters_are_400_with_a_plain_body(self) -> None:
        path = self.put("av_moov_end.mp4")
        for query in ("start=-1", "start=nan", "start=inf", "start=-inf", "start=abc", "start=1e400",
                      "start=5&end=5", "start=5&end=4", "end=0", "end=-2", "start=1&end=x"):
            response, body = await self.fetch(f"{path}?{query}")
            self.assert_plain_error(response, body, (400,))
        self.assertEqual(self.origin.requests, 0, "bad parameters are refused before the origin is asked")

    async def test_start_at_or_past_the_duration_is_416(self) -> None:
        """
        The chosen behaviour: a C{start} at or after the end of the clip is 416 (the seek lies wholly
        outside the representation, as a Range would), with a plain body.
        """
        path = self.put("av_moov_end.mp4")
        for query in ("start=20", "start=20.5", "start=99999", "start=25&end=30"):
            response, body = await self.fetch(f"{path}?{query}")
            self.assert_plain_error(response, body, (416,))

    async def test_fragmented_mp4_seek_is_501_and_whole_file_still_200(self) -> None:
        path = self.put("fragmented.mp4")
        response, body = await self.fetch(path + "?start=2")
        self.assert_plain_error(response, body, (501,))
        self.assertIn(b"fragmented", body)
        response, body = await self.fetch(path)
        self.assertEqual(response.code, 200)
        self.assertTrue(body == original("fragmented.mp4").data)

    async def test_moov_over_the_cap_is_501_without_fetching_it(self) -> None:
        await self._stop_once(self._stop_edge)
        self.start_edge(max_moov=100_000)
        path = self.put("long_big_moov.mp4")
        response, body = await self.fetch(path + "?start=5")
        self.assert_plain_error(response, body, (501,))
        self.assertIn(b"moov", body)
        self.assertLessEqual(self.origin.bytes_sent, 2 * SLICE)

    async def test_concurrent_seeks_into_a_malformed_file_all_fail_cleanly(self) -> None:
        data = bytearray(original("av_moov_end.mp4").data)
        moov_offset, _ = original("av_moov_end.mp4").box(b"moov")
        at = data.index(b"stsz", moov_offset) + 12
        data[at : at + 4] = struct.pack(">I", 0x3FFFFFFF)
        path = self.put("av_moov_end.mp4", "/v/bad.mp4", bytes(data))
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.fetch(f"{path}?start={i + 1}")) for i in range(6)]
        )
        for response, body in results:
            self.assert_plain_error(response, body, (502,))
        response, body = await self.fetch(path + "?start=1")
        self.assert_plain_error(response, body, (502,))

    async def test_seek_into_a_missing_file_relays_the_404(self) -> None:
        response, body = await self.fetch("/v/nothing.mp4?start=5")
        self.assertEqual(response.code, 404)

    async def check_malformed(self, data: bytes) -> None:
        path = self.put("av_moov_end.mp4", "/v/broken.mp4", data)
        response, body = await self.fetch(path + "?start=5")
        self.assert_plain_error(response, body, (400, 416, 500, 501, 502))
        self.assertNotEqual(response.code, 500, "a malformed file is the origin's fault, not an internal error")
        # the edge still serves: the same file whole, and a good clip with a seek
        response, body = await self.fetch(path)
        self.assertTrue((response.code, body) == (200, data))
        good = self.put("av_moov_end.mp4")
        response, body = await self.fetch(good + "?start=5")
        self.assertEqual(response.code, 200)
        self.check_cut("av_moov_end.mp4", body, 5)

    async def test_truncated_moov(self) -> None:
        data = original("av_moov_end.mp4").data
        moov_offset, moov_size = original("av_moov_end.mp4").box(b"moov")
        await self.check_malformed(data[: moov_offset + moov_size // 2])

    def lie_about(self, box_type: bytes, size: int) -> bytes:
        """The moov-at-end clip with the size field of the first C{box_type} box (inside moov) replaced."""
        data = bytearray(original("av_moov_end.mp4").data)
        moov_offset, _ = original("av_moov_end.mp4").box(b"moov")
        at = data.index(box_type, moov_offset) - 4
        data[at : at + 4] = struct.pack(">I", size)
        return bytes(data)

    async def test_box_inside_moov_lies_about_its_size(self) -> None:
        await self.check_malformed(self.lie_about(b"stco", 0x7FFFFFF0))

    async def test_sample_table_lies_about_its_entry_count(self) -> None:
        data = bytearray(original("av_moov_end.mp4").data)
        moov_offset, _ = original("av_moov_end.mp4").box(b"moov")
        at = data.index(b"stsz", moov_offset) + 4 + 8  # version/flags, sample_size, then sample_count
        data[at : at + 4] = struct.pack(">I", 0x3FFFFFFF)
        await self.check_malformed(bytes(data))

    async def test_trak_smaller_than_its_children(self) -> None:
        await self.check_malformed(self.lie_about(b"trak", 16))

    async def test_top_level_box_lies_about_its_size(self) -> None:
        data = bytearray(original("av_moov_end.mp4").data)
        mdat_offset, _ = original("av_moov_end.mp4").box(b"mdat")
        data[mdat_offset : mdat_offset + 4] = struct.pack(">I", 9)  # the next "box" starts in media data
        await self.check_malformed(bytes(data))

    async def test_moov_size_past_the_end_of_the_file(self) -> None:
        data = bytearray(original("av_moov_end.mp4").data)
        moov_offset, _ = original("av_moov_end.mp4").box(b"moov")
        data[moov_offset : moov_offset + 4] = struct.pack(">I", 0xFFFFFFF0)
        await self.check_malformed(bytes(data))

    async def test_no_moov_at_all(self) -> None:
        data = bytearray(original("av_moov_end.mp4").data)
        moov_offset, _ = original("av_moov_end.mp4").box(b"moov")
        data[moov_offset + 4 : moov_offset + 8] = b"junk"
        await self.check_malformed(bytes(data))


class FLVSeekTests(SeekEdgeTestCase):
    name = "av.flv"

    def keyframe_positions(self) -> tuple[int, ...]:
        data = original(self.name).data
        return flv.parse_flv_head(data[: 1 << 20], len(data)).keyframe_positions

    async def test_seek_to_a_keyframe_position_decodes_from_a_keyframe(self) -> None:
        positions = self.keyframe_positions()
        self.assertGreater(len(positions), 5)
        path = self.put(self.name)
        response, body = await self.fetch(f"{path}?start={positions[4]}")
        self.assertEqual(response.code, 200)
        self.assertEqual(body[:3], b"FLV")
        self.assertTrue(body.endswith(original(self.name).data[positions[4]:]))
        out = decode(body, ".flv")
        self.assertEqual(out.errors, "")
        self.assertTrue(out.first_video_flags and out.first_video_flags.startswith("K"), out.first_video_flags)
        self.assertEqual(set(out.streams), {"video", "audio"})
        # FLV seeks keep the original timestamps (and onMetaData): the answer is the original from the
        # keyframe on, every video packet of it
        packets = video_packet_offsets(self.name)
        kept = [time for time, pos in packets if pos >= positions[4]]
        self.assertEqual(out.first_video_time, kept[0])
        self.assertGreater(kept[0], 5)
        self.assertEqual(int(out.streams["video"]["nb_read_packets"]), len(kept))

    async def test_start_that_is_not_a_tag_boundary_is_400(self) -> None:
        position = self.keyframe_positions()[3]
        path = self.put(self.name)
        for start in (position + 1, position - 1, 5, 1):
            response, body = await self.fetch(f"{path}?start={start}")
            self.assert_plain_error(response, body, (400,))

    async def test_start_past_the_end_is_400(self) -> None:
        path = self.put(self.name)
        size = len(original(self.name).data)
        for start in (size, size + 1, 10**15):
            response, body = await self.fetch(f"{path}?start={start}")
            self.assert_plain_error(response, body, (400,))

    async def test_bad_start_is_400(self) -> None:
        path = self.put(self.name)
        for start in ("-5", "abc", "1.5", "1e3"):
            response, body = await self.fetch(f"{path}?start={start}")
            self.assert_plain_error(response, body, (400,))

    async def test_keyframe_index_that_lies_is_not_trusted(self) -> None:
        """onMetaData's filepositions come from the file: an entry off a tag boundary is still a 400."""
        position = self.keyframe_positions()[3]
        data = original(self.name).data
        encoded = struct.pack(">d", float(position))
        self.assertEqual(data.count(encoded), 1)
        lying = data.replace(encoded, struct.pack(">d", float(position + 1)))
        self.assertIn(position + 1, flv.parse_flv_head(lying[: 1 << 20], len(lying)).keyframe_positions)
        path = self.put(self.name, "/v/lying.flv", lying)
        response, body = await self.fetch(f"{path}?start={position + 1}")
        self.assert_plain_error(response, body, (400,))

    async def test_seek_etag_304_and_range(self) -> None:
        position = self.keyframe_positions()[2]
        path = self.put(self.name)
        response, whole = await self.fetch(f"{path}?start={position}")
        etag = header(response, "ETag")
        assert etag is not None
        self.assertNotEqual(etag, self.origin.files[path].etag)
        response, body = await self.fetch(f"{path}?start={position}", {"If-None-Match": etag})
        self.assertEqual((response.code, body), (304, b""))
        response, body = await self.fetch(f"{path}?start={position}", {"Range": "bytes=-1000"})
        self.assertEqual(response.code, 206)
        self.assertEqual(header(response, "Content-Range"), f"bytes {len(whole) - 1000}-{len(whole) - 1}/{len(whole)}")
        self.assertTrue(body == whole[-1000:])

    async def test_not_an_flv_is_502(self) -> None:
        path = self.put(self.name, "/v/not.flv", original("av_moov_end.mp4").data)
        response, body = await self.fetch(path + "?start=1000")
        self.assert_plain_error(response, body, (502,))

    async def test_start_zero_is_the_whole_file(self) -> None:
        path = self.put(self.name)
        for query in ("?start=0", ""):
            response, body = await self.fetch(path + query)
            self.assertEqual(response.code, 200)
            self.assertTrue(body == original(self.name).data)


class SeekSampleTests(SeekEdgeTestCase):
    async def test_random_starts_and_ends_on_a_cached_clip(self) -> None:
        """
        A seeded sample of (start, end) pairs, rather than hypothesis: each example needs the reactor
        and a decoder run, and a fixed sample keeps the run time known.
        """
        name = "av_moov_end.mp4"
        path = self.put(name)
        await self.fetch(path)
        requests = self.origin.requests
        rng = random.Random(20240607)
        pairs: list[tuple[float, Optional[float]]] = []
        while len(pairs) < 12:
            start = round(rng.uniform(0, 19.9), 3)
            end: Optional[float] = None
            if rng.random() < 0.6:
                end = round(rng.uniform(start, 25), 3)
                # an end at or before the keyframe the cut starts from leaves nothing to show
                if end <= original(name).keyframe_at_or_before(start) + FRAME:
                    continue
            pairs.append((start, end))
        for start, end in pairs:
            query = f"?start={start}" + (f"&end={end}" if end is not None else "")
            response, body = await self.fetch(path + query)
            self.assertEqual(response.code, 200, query)
            self.assertEqual(header(response, "X-Cache"), "HIT", query)
            self.check_cut(name, body, start, end)
        self.assertEqual(self.origin.requests, requests)


class ConcurrentSeekTests(SeekEdgeTestCase):
    async def test_concurrent_cold_seeks_fetch_the_moov_once(self) -> None:
        name = "av_moov_end.mp4"
        source = original(name)
        moov_offset, moov_size = source.box(b"moov")
        path = self.put(name)
        self.origin.dribble = (16 * 1024, 0.002)
        parses = []
        parse = self.edge._parse_mp4

        def counting_parse(*args: Any) -> Any:
            parses.append(args)
            return parse(*args)

        self.edge._parse_mp4 = counting_parse  # type: ignore[method-assign, assignment]
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.fetch(f"{path}?start={2 + i * 1.5}")) for i in range(10)]
        )
        for i, (response, body) in enumerate(results):
            self.assertEqual(response.code, 200)
            self.assertEqual(decode(body).errors, "", i)
        first_slice = moov_offset // SLICE
        last_slice = (moov_offset + moov_size - 1) // SLICE
        for n in range(first_slice, last_slice + 1):
            covering = [entry for entry in self.origin.log if _covers(entry.range, n * SLICE)]
            self.assertEqual(len(covering), 1, f"slice {n} of the moov fetched {len(covering)} times")
        self.assertEqual(len(parses), 1, "the moov was parsed more than once")
        self.assertLessEqual(self.origin.bytes_sent, len(source.data) + SLICE)


def _covers(range_header: Optional[str], offset: int) -> bool:
    if range_header is None:
        return True
    first_s, _, last_s = range_header.partition("=")[2].partition("-")
    first = int(first_s) if first_s else 0
    last = int(last_s) if last_s else math.inf
    return first <= offset <= last


class SeekAnswerFileMixin:
    """Answers written to a scratch file for decoders that need a path."""

    def answer_file(self, body: bytes, name: str = "answer.mp4") -> Path:
        directory = Path(tempfile.mkdtemp(prefix="h264edge-seek-edge-"))
        self.addCleanup(shutil.rmtree, directory, True)  # type: ignore[attr-defined]
        path = directory / name
        path.write_bytes(body)
        return path


class TimedTrackEdgeTests(SeekAnswerFileMixin, SeekEdgeTestCase):
    """subs.mp4: A/V, mov_text subtitles and chapters (a chapter text track and udta/chpl)."""

    async def test_cold_and_warm_seeks_keep_subtitles_and_chapters(self) -> None:
        path = self.put("subs.mp4")
        cold_response, cold = await self.fetch(path + "?start=9")
        warm_response, warm = await self.fetch(path + "?start=9")
        self.assertEqual((cold_response.code, header(cold_response, "X-Cache")), (200, "MISS"))
        self.assertEqual((warm_response.code, header(warm_response, "X-Cache")), (200, "HIT"))
        self.assertTrue(cold == warm, "cold and warm answers differ")
        out = decode(cold)
        self.assertEqual(out.errors, "")
        self.assertEqual(set(out.streams), {"video", "audio", "subtitle", "data"})
        self.assertTrue(out.first_video_flags and out.first_video_flags.startswith("K"))
        answer = self.answer_file(cold)
        self.assertEqual(subtitles(answer), [(0.0, 1.8, "third cue, long"), (2.5, 3.5, "fourth cue")])
        self.assertEqual(chapters(answer), [("Middle", 0.0, 0.5), ("End", 0.5, 4.0)])
        links = track_links(cold)
        self.assertTrue(all(set(ids) <= set(links) for refs in links.values() for ids in refs.values()))

    async def test_end_cuts_subtitles_and_chapters(self) -> None:
        path = self.put("subs.mp4")
        response, body = await self.fetch(path + "?start=5&end=9.2")
        self.assertEqual(response.code, 200)
        answer = self.answer_file(body)
        self.assertEqual(subtitles(answer), [(0.0, 2.5, "second cue"), (3.0, 5.2, "third cue, long")])
        self.assertEqual(chapters(answer), [("Middle", 0.0, 4.5), ("End", 4.5, 5.2)])
        for kind, stream in decode(body).streams.items():
            self.assert_close(float(stream["duration"]), 5.2, 0.001, f"{kind} duration")

    async def test_whole_file_is_still_the_original(self) -> None:
        path = self.put("subs.mp4")
        response, body = await self.fetch(path)
        self.assertTrue((response.code, body) == (200, original("subs.mp4").data))


class LateVideoEdgeTests(SeekEdgeTestCase):
    """late_video.mp4: audio from 0 s, video from 1 s."""

    async def test_audio_before_the_video_start_is_kept(self) -> None:
        path = self.put("late_video.mp4")
        for query in ("?start=0&end=4", "?end=4"):
            response, body = await self.fetch(path + query)
            self.assertEqual(response.code, 200, query)
            out = decode(body)
            self.assertEqual(out.errors, "")
            self.assert_close(float(out.streams["audio"]["start_time"]), 0.0, 0.001, "audio start")
            self.assert_close(float(out.streams["audio"]["duration"]), 4.0, 0.001, "audio duration")
            self.assert_close(float(out.streams["video"]["start_time"]), 1.0, 0.001, "video start")
            self.assert_close(out.format_duration, 4.0, 0.001, "duration")
            self.assertTrue(out.first_video_flags and out.first_video_flags.startswith("K"))

    async def test_with_exact_seek(self) -> None:
        await self._stop_once(self._stop_edge)
        self.start_edge(exact_seek=True)
        path = self.put("late_video.mp4")
        response, body = await self.fetch(path + "?start=0.5&end=4")
        out = decode(body)
        self.assertEqual(out.errors, "")
        self.assert_close(float(out.streams["audio"]["duration"]), 3.5, 0.001, "audio duration")
        self.assert_close(float(out.streams["video"]["start_time"]), 0.5, 0.001, "video start")


class KeyframeSnapEdgeTests(SeekEdgeTestCase):
    """vfr.mp4: 25, 60 then 12 fps, keyframes at 0, 3, 5 and 7.3333... s."""

    async def test_start_rounded_down_from_a_keyframe_time_starts_there(self) -> None:
        path = self.put("vfr.mp4")
        video_end = original("vfr.mp4").durations["video"]
        for start in ("7.333333", "7.33"):
            response, body = await self.fetch(f"{path}?start={start}")
            self.assertEqual(response.code, 200)
            out = decode(body, decode_seconds=None)
            self.assertEqual(decode_errors_vfr(body), "")
            self.assertTrue(out.first_video_flags and out.first_video_flags.startswith("K"))
            self.assert_close(float(out.streams["video"]["duration"]), video_end - 4400 / 600, 0.001, start)


def decode_errors_vfr(body: bytes) -> str:
    path = _scratch() / (hashlib.sha256(body).hexdigest()[:20] + "-vfr.mp4")
    path.write_bytes(body)
    try:
        return decode_errors(path, *VFR_DECODE)
    finally:
        path.unlink()


class FLVKeyframeTagTests(SeekEdgeTestCase):
    name = "av.flv"

    async def test_start_on_a_tag_that_is_not_a_video_keyframe_is_400(self) -> None:
        data = original(self.name).data
        index = flv.parse_flv_head(data[: 1 << 20], len(data))
        tags, offset = [], index.first_tag_offset
        while offset + 11 <= len(data):
            tags.append(offset)
            offset += 15 + int.from_bytes(data[offset + 1 : offset + 4], "big")
        later = [tag for tag in tags if tag > index.keyframe_positions[2]]
        p_frame = next(tag for tag in later if data[tag] == 9 and data[tag + 11] >> 4 == 2)
        audio = next(tag for tag in later if data[tag] == 8)
        path = self.put(self.name)
        for start in (p_frame, audio, index.first_tag_offset):
            response, body = await self.fetch(f"{path}?start={start}")
            self.assert_plain_error(response, body, (400,))
            self.assertIn(b"keyframe", body)
        response, body = await self.fetch(f"{path}?start={index.keyframe_positions[3]}")
        self.assertEqual(response.code, 200)


class WarmErrorAnswerTests(SeekEdgeTestCase):
    async def test_seek_past_the_end_of_a_cached_clip_is_a_416_hit(self) -> None:
        path = self.put("av_moov_end.mp4")
        response, body = await self.fetch(path + "?start=25")
        self.assert_plain_error(response, body, (416,))
        self.assertEqual(header(response, "X-Cache"), "MISS")
        await self.fetch(path)
        response, body = await self.fetch(path + "?start=25")
        self.assert_plain_error(response, body, (416,))
        self.assertEqual(header(response, "X-Cache"), "HIT")

    async def test_seek_into_a_cached_fragmented_clip_is_a_501_hit(self) -> None:
        path = self.put("fragmented.mp4")
        response, body = await self.fetch(path + "?start=2")
        self.assert_plain_error(response, body, (501,))
        self.assertEqual(header(response, "X-Cache"), "MISS")
        response, body = await self.fetch(path + "?start=2")
        self.assert_plain_error(response, body, (501,))
        self.assertEqual(header(response, "X-Cache"), "HIT")


class LyingSampleSizeTests(SeekEdgeTestCase):
    """One stsz entry of 0x7FFFFFFF in the last chunk a cut keeps (sample 249 of av_moov_end.mp4)."""

    def lying(self) -> str:
        data = bytearray(original("av_moov_end.mp4").data)
        moov_offset, _ = original("av_moov_end.mp4").box(b"moov")
        at = data.index(b"stsz", moov_offset) + 16 + 4 * 249
        data[at : at + 4] = struct.pack(">I", 0x7FFFFFFF)
        return self.put("av_moov_end.mp4", "/v/lying.mp4", bytes(data))

    async def test_is_502_at_once(self) -> None:
        path = self.lying()
        for query in ("?start=5&end=10", "?start=5", "?start=1&end=3"):
            response, body = await self.fetch(path + query)
            self.assert_plain_error(response, body, (502,))
            self.assertIn(b"past the end", body)
        _, moov_size = original("av_moov_end.mp4").box(b"moov")
        self.assertLessEqual(self.origin.bytes_sent, moov_size + 2 * SLICE, "sample data was fetched")

    async def test_a_plan_past_the_object_is_502_before_any_byte(self) -> None:
        """Were a plan builder to miss such a file, the producer still refuses the plan, not waits."""
        from h264edge.mp4._tables import SampleTables
        from h264edge.plan import Plan

        self.patch(SampleTables, "check_data_within", lambda *args: None)
        self.patch(Plan, "spans_end", lambda *args: 0)
        path = self.lying()
        response, body = await self.fetch(path + "?start=5&end=10")
        self.assert_plain_error(response, body, (502,))
        self.assertIn(b"which has", body)
