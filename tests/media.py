"""
Test clips made by ffmpeg (Debian's ffmpeg with libx264 + aac), cached between runs.

Clips are synthetic (lavfi sources) and made on first use; the cache directory is
C{$H264EDGE_TEST_MEDIA} or C{~/.cache/h264edge-test-media}, keyed by a hash of the ffmpeg arguments,
so a changed recipe makes a new file.  See MEDIA.md-style recipes below.
"""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import subprocess
from pathlib import Path

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")

AV_SOURCES = [
    "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25",
    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
]
VIDEO_X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-g", "50", "-pix_fmt", "yuv420p"]
AUDIO_AAC = ["-c:a", "aac", "-b:a", "64k"]

RECIPES: dict[str, list[str]] = {
    # moov at end (ffmpeg's default), keyframe every 2 s
    "av_moov_end.mp4": AV_SOURCES + ["-t", "20"] + VIDEO_X264 + AUDIO_AAC,
    "av_faststart.mp4": AV_SOURCES + ["-t", "20"] + VIDEO_X264 + AUDIO_AAC + ["-movflags", "+faststart"],
    "bframes.mp4": AV_SOURCES
    + ["-t", "20", "-c:v", "libx264", "-preset", "veryfast", "-bf", "3", "-g", "48", "-pix_fmt", "yuv420p"]
    + AUDIO_AAC,
    "audio_only.mp4": ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100", "-t", "20"] + AUDIO_AAC,
    "video_only.mp4": ["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25", "-t", "20"] + VIDEO_X264,
    "long_big_moov.mp4": [
        "-f", "lavfi", "-i", "testsrc2=size=64x36:rate=25",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
        "-t", "1200", "-c:v", "libx264", "-preset", "ultrafast", "-g", "50", "-b:v", "20k",
        "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "16k",
    ],
    "fragmented.mp4": AV_SOURCES + ["-t", "6"] + VIDEO_X264 + AUDIO_AAC
    + ["-movflags", "frag_keyframe+empty_moov"],
    "av.flv": AV_SOURCES + ["-t", "20", "-c:v", "libx264", "-preset", "ultrafast", "-g", "50",
                            "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k",
                            "-f", "flv", "-flvflags", "add_keyframe_index"],
}


SMALL_VIDEO = ["-f", "lavfi", "-i", "testsrc2=size=160x90:rate=25"]
SMALL_AUDIO = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"]
SMALL_X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-g", "50", "-pix_fmt", "yuv420p"]
SMALL_AAC = ["-c:a", "aac", "-b:a", "32k"]
SMALL_AV = SMALL_VIDEO + SMALL_AUDIO + SMALL_X264 + SMALL_AAC

# VFR: 25, 60 then 12 fps (keyframes where each part starts and at 7.3333... s, in a 1/600 s timescale)
RECIPES["vfr.mp4"] = [
    "-f", "lavfi", "-i", "testsrc2=size=160x90:rate=25:duration=3",
    "-f", "lavfi", "-i", "testsrc2=size=160x90:rate=60:duration=2",
    "-f", "lavfi", "-i", "testsrc2=size=160x90:rate=12:duration=4",
    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
    "-filter_complex", "[0:v][1:v][2:v]concat=n=3:v=1:a=0[v]", "-map", "[v]", "-map", "3:a", "-t", "9",
    "-c:v", "libx264", "-preset", "ultrafast", "-g", "250", "-force_key_frames", "0,3,5,7.3333333",
    "-pix_fmt", "yuv420p", "-fps_mode", "vfr", "-video_track_timescale", "600", "-c:a", "aac", "-b:a", "32k",
]  # fmt: skip

SUBTITLES_SRT = """1
00:00:00,500 --> 00:00:02,000
first cue

2
00:00:03,000 --> 00:00:06,500
second cue

3
00:00:07,000 --> 00:00:09,800
third cue, long

4
00:00:10,500 --> 00:00:11,500
fourth cue
"""

CHAPTERS_FFMETADATA = """;FFMETADATA1
title=subtitles and chapters

[CHAPTER]
TIMEBASE=1/1000
START=0
END=4000
title=Opening

[CHAPTER]
TIMEBASE=1/1000
START=4000
END=8500
title=Middle

[CHAPTER]
TIMEBASE=1/1000
START=8500
END=12000
title=End
"""


def text_input(name: str, text: str) -> Path:
    """A text file (subtitles, ffmetadata) for a recipe, named by a hash of its content."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    stem, _, ext = name.rpartition(".")
    path = media_dir() / f"{stem}-{digest}.{ext}"
    if not path.exists():
        tmp = path.with_name(path.name + ".part." + str(os.getpid()))
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def subtitles_clip() -> Path:
    """
    12 s of 160x90 A/V with a mov_text subtitle track (from L{SUBTITLES_SRT}) and chapters (from
    L{CHAPTERS_FFMETADATA}): ffmpeg writes them as a chapter text track that the other tracks name
    with C{tref chap}, and as a Nero C{udta/chpl} list.
    """
    base = clip("subs_av.mp4", SMALL_AV + ["-t", "12"])
    return clip("subs.mp4", [
        "-i", str(base), "-i", str(text_input("subs.srt", SUBTITLES_SRT)),
        "-i", str(text_input("chapters.ffmeta", CHAPTERS_FFMETADATA)),
        "-map", "0", "-map", "1", "-map_metadata", "2", "-map_chapters", "2", "-c", "copy", "-c:s", "mov_text",
    ])  # fmt: skip


def late_video_clip() -> Path:
    """6 s of audio from 0 s and 5 s of 160x90 video from 1 s: an empty edit in front of the video."""
    video = clip("late_video_part.mp4", SMALL_VIDEO + SMALL_X264 + ["-t", "5"])
    audio = clip("late_audio_part.mp4", SMALL_AUDIO + SMALL_AAC + ["-t", "6"])
    return clip("late_video.mp4", [
        "-i", str(audio), "-itsoffset", "1", "-i", str(video), "-map", "1:v", "-map", "0:a", "-c", "copy",
    ])  # fmt: skip


def media_dir() -> Path:
    root = Path(os.environ.get("H264EDGE_TEST_MEDIA") or Path.home() / ".cache" / "h264edge-test-media")
    root.mkdir(parents=True, exist_ok=True)
    return root


def have_ffmpeg() -> bool:
    return FFMPEG is not None and FFPROBE is not None


def clip(name: str, recipe: list[str] | None = None) -> Path:
    """The path of clip C{name}, made with C{recipe} (default: C{RECIPES[name]}) if not made yet."""
    args = recipe if recipe is not None else RECIPES[name]
    digest = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:12]
    stem, dot, ext = name.rpartition(".")
    path = media_dir() / f"{stem}-{digest}.{ext}"
    if not path.exists():
        if FFMPEG is None:
            raise RuntimeError("ffmpeg is not installed (apt-get install -y ffmpeg)")
        tmp = path.with_name(path.name + ".part." + str(os.getpid()))
        fmt = [] if "-f" in args[-4:] else ["-f", "mp4" if ext == "mp4" else ext]
        subprocess.run(
            [FFMPEG, "-nostdin", "-loglevel", "error", "-y", *args, *fmt, str(tmp)],
            check=True,
        )
        os.replace(tmp, path)
    return path


VFR_DECODE = ["-fps_mode", "vfr", "-enc_time_base", "-1"]
"""Output options for L{decode_errors} of a VFR clip: frames keep their own times (else the null
muxer's 1/25 s clock reports non-monotonic timestamps for frames closer than that)."""


def decode_errors(path: str | Path, *output: str) -> str:
    """What ffmpeg reports when decoding every stream of C{path}; empty when it decodes cleanly."""
    result = subprocess.run(
        [FFMPEG or "ffmpeg", "-nostdin", "-v", "error", "-xerror", "-i", str(path), *output, "-f", "null", "-"],
        capture_output=True,
        text=True,
    )
    return (result.stderr.strip() + (f"\nexit {result.returncode}" if result.returncode else "")).strip()


def ffprobe_json(path: str | Path, *args: str) -> dict:
    result = subprocess.run(
        [FFPROBE or "ffprobe", "-v", "error", "-of", "json", *args, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def edit_list_clip() -> Path:
    """A stream copy of bframes.mp4 from 0.5 s: ffmpeg keeps the lead-in from the keyframe and hides it
    with edit lists (video elst media_time beyond its B-frame shift, audio likewise)."""
    return clip("edit_list.mp4", ["-ss", "0.5", "-i", str(clip("bframes.mp4")), "-c", "copy"])


def top_level_boxes(path: str | Path) -> list[tuple[bytes, int, int]]:
    """(type, offset, size) of each top-level box of C{path}, read with plain struct (no h264edge code)."""
    import struct

    boxes = []
    with open(path, "rb") as f:
        size_total = os.fstat(f.fileno()).st_size
        offset = 0
        while offset + 8 <= size_total:
            f.seek(offset)
            header = f.read(16)
            size, box_type = struct.unpack(">I4s", header[:8])
            if size == 1:
                (size,) = struct.unpack(">Q", header[8:16])
            elif size == 0:
                size = size_total - offset
            boxes.append((box_type, offset, size))
            if size < 8:
                break
            offset += size
    return boxes


def frame_hashes(path: str | Path, stream: str = "v:0") -> list[str]:
    """The MD5 of every decoded frame of one stream, in presentation order (ffmpeg's framemd5)."""
    result = subprocess.run(
        [FFMPEG or "ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", f"0:{stream}",
         "-f", "framemd5", "-"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.rsplit(",", 1)[1].strip() for line in result.stdout.splitlines() if line and line[0] != "#"]


#: ffprobe lines from a decoder (it decodes a few frames to learn the streams): about the media's bytes,
#: which a mutated sample table misaligns, not about the container
_DECODER_LINE = re.compile(r"^\[(h264|aac|mp3\w*|hevc) @ ")


def probe_clean(data: bytes) -> bool:
    """
    Whether ffprobe reads C{data} (an MP4) and every packet of it without a container error (what its
    decoders say of the frames it tries is left out: see L{_DECODER_LINE}).
    """
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        result = subprocess.run(
            [FFPROBE or "ffprobe", "-v", "error", "-count_packets", "-show_entries", "stream=nb_read_packets",
             "-of", "csv=p=0", f.name], capture_output=True, timeout=60)
    errors = [line for line in result.stderr.decode("utf-8", "replace").splitlines()
              if line.strip() and not _DECODER_LINE.match(line)]
    return result.returncode == 0 and not errors
