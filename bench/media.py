"""
The benchmark's media, made with ffmpeg (lavfi test sources, the recipes of /work/shared/MEDIA.md)
into a directory outside git, and reused when present (files are written to .part and renamed, so a
file that exists is whole).

Full set (made once, ~2 minutes on 2 idle cores; the 1 GiB encode alone took 60 s):
  big_720p.mp4     1280x720, -b:v 12M, 720 s, ultrafast: ~1.04 GB (hit throughput, cold single seek,
                   slow viewers)
  clip100.mp4      the first 67 s of big_720p.mp4, stream-copied: ~100 MB (miss figure, Zipf)
  two_hours.mp4    192x108, -b:v 30k, 7200 s, aac 24k: ~53 MB with a ~4.6 MB moov (seek figures, Zipf)
  tenmin_360p.mp4  640x360, -b:v 1M, 600 s: ~80 MB (Zipf)
  small16k.bin     16 KiB of random bytes (small-object hits)
--quick uses a tiny set in the subdirectory quick/ (a few seconds to make).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

AV = ["-f", "lavfi", "-i", "testsrc2=size={size}:rate=25",
      "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"]
X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-g", "50", "-pix_fmt", "yuv420p"]


def _encode(size: str, seconds: int, vbitrate: str, abitrate: str = "64k") -> list[str]:
    return ([a.format(size=size) for a in AV] + ["-t", str(seconds)] + X264
            + ["-b:v", vbitrate, "-c:a", "aac", "-b:a", abitrate])


@dataclass(frozen=True)
class MediaSet:
    root: str
    big: str  # ~1 GiB (quick: ~12 MB) MP4, whole-file throughput
    mid: str  # ~100 MB MP4, the miss figure
    long: str  # two-hour clip with a big moov
    long_seconds: int
    big_seconds: int
    small: str  # 16 KiB object
    zipf: tuple  # (name, duration seconds), most popular first

    def url(self, name: str) -> str:
        return "/" + name


def full_recipes() -> list[tuple[str, list[str]]]:
    return [
        ("big_720p.mp4", _encode("1280x720", 720, "12M")),
        ("clip100.mp4", ["-i", "{root}/big_720p.mp4", "-t", "67", "-c", "copy"]),
        ("two_hours.mp4", _encode("192x108", 7200, "30k", "24k")),
        ("tenmin_360p.mp4", _encode("640x360", 600, "1M")),
    ]


def quick_recipes() -> list[tuple[str, list[str]]]:
    return [
        ("big_720p.mp4", _encode("1280x720", 8, "12M")),
        ("clip100.mp4", ["-i", "{root}/big_720p.mp4", "-t", "4", "-c", "copy"]),
        ("two_hours.mp4", _encode("192x108", 300, "30k", "24k")),
    ]


def make(root: str, quick: bool, log=print) -> MediaSet:
    if quick:
        root = os.path.join(root, "quick")
    os.makedirs(root, exist_ok=True)
    ffmpeg = shutil.which("ffmpeg")
    for name, recipe in (quick_recipes() if quick else full_recipes()):
        path = os.path.join(root, name)
        if os.path.exists(path):
            continue
        if ffmpeg is None:
            raise SystemExit("ffmpeg is needed: apt-get install -y ffmpeg")
        tmp = f"{path}.part{os.getpid()}.mp4"
        args = [a.format(root=root) for a in recipe]
        log(f"making {path} with ffmpeg ...")
        t0 = time.monotonic()
        subprocess.run([ffmpeg, "-nostdin", "-loglevel", "error", "-y", *args, "-f", "mp4", tmp], check=True)
        os.replace(tmp, path)
        log(f"  {os.path.getsize(path) / 1e6:.0f} MB in {time.monotonic() - t0:.0f} s")
    small = os.path.join(root, "small16k.bin")
    if not os.path.exists(small):
        with open(small + ".part", "wb") as f:
            f.write(os.urandom(16384))
        os.replace(small + ".part", small)
    if quick:
        zipf = (("two_hours.mp4", 300), ("big_720p.mp4", 8))
        return MediaSet(root, os.path.join(root, "big_720p.mp4"), os.path.join(root, "clip100.mp4"),
                        os.path.join(root, "two_hours.mp4"), 300, 8, small, zipf)
    zipf = (("two_hours.mp4", 7200), ("tenmin_360p.mp4", 600), ("clip100.mp4", 67))
    return MediaSet(root, os.path.join(root, "big_720p.mp4"), os.path.join(root, "clip100.mp4"),
                    os.path.join(root, "two_hours.mp4"), 7200, 720, small, zipf)


def decode_errors(path: str, timeout: float = 300.0) -> str:
    """What ffmpeg reports decoding every stream of C{path}; empty when it decodes cleanly."""
    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-xerror", "-i", path, "-f", "null", "-"],
        capture_output=True, text=True, timeout=timeout,
    )
    return (result.stderr.strip() + (f" (exit {result.returncode})" if result.returncode else "")).strip()
