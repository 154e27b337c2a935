# -*- test-case-name: tests.test_cli -*-
"""
C{h264edge demo}: an edge in front of a local origin that serves generated sample clips.

Nothing to start by hand: the sample clips are made with ffmpeg on first run, a Twisted static file
server plays the origin on 127.0.0.1, and the edge listens beside it.  C{--check} makes a few requests
through the edge, checks the answers with ffprobe, and exits (used by the tests and by newcomers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Optional

SAMPLE_MP4 = [
    "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25",
    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
    "-t", "60", "-c:v", "libx264", "-preset", "ultrafast", "-g", "50", "-pix_fmt", "yuv420p",
    "-c:a", "aac", "-b:a", "64k",
]
SAMPLE_FLV = SAMPLE_MP4 + ["-f", "flv", "-flvflags", "add_keyframe_index"]


def make_samples(origin_dir: str) -> list[str]:
    """Make the sample clips (moov at the end, as ffmpeg writes by default) unless they exist."""
    os.makedirs(origin_dir, exist_ok=True)
    ffmpeg = shutil.which("ffmpeg")
    made = []
    for name, recipe in (("sample.mp4", SAMPLE_MP4), ("sample.flv", SAMPLE_FLV)):
        path = os.path.join(origin_dir, name)
        if not os.path.exists(path):
            if ffmpeg is None:
                raise SystemExit("ffmpeg is needed to make the sample clips: apt-get install -y ffmpeg")
            print(f"making {path} with ffmpeg ...", flush=True)
            tmp = path + ".part"
            fmt = [] if "-f" in recipe[-4:] else ["-f", "mp4"]
            subprocess.run([ffmpeg, "-nostdin", "-loglevel", "error", "-y", *recipe, *fmt, tmp], check=True)
            os.replace(tmp, path)
        made.append(path)
    return made


def flv_keyframe(path: str) -> int:
    """A keyframe byte offset near the middle of an FLV, from its onMetaData keyframes index."""
    from h264edge import flv

    with open(path, "rb") as f:
        head = f.read(flv.FLV_HEAD_READ)
    index = flv.parse_flv_head(head, os.path.getsize(path))
    positions = index.keyframe_positions
    return positions[len(positions) // 2] if positions else 0


def _check(edge_url: str, reactor: Any, flv_offset: int) -> "Any":
    """Fetch the sample whole and seeked through the edge; verify with ffprobe."""
    import treq
    from twisted.internet.defer import Deferred

    async def run() -> int:
        failures = 0
        for path in ("/sample.mp4", "/sample.mp4?start=30", "/sample.mp4?start=12.5&end=20",
                     "/sample.flv", f"/sample.flv?start={flv_offset}"):
            response = await treq.get(edge_url + path, reactor=reactor)
            body = await response.content()
            with tempfile.NamedTemporaryFile(suffix=os.path.splitext(path.split("?")[0])[1]) as f:
                f.write(body)
                f.flush()
                probe = subprocess.run(
                    ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", f.name],
                    capture_output=True, text=True,
                )
            ok = response.code == 200 and probe.returncode == 0 and not probe.stderr.strip()
            failures += not ok
            cache = response.headers.getRawHeaders("X-Cache", ["?"])[0]
            print(f"{'ok  ' if ok else 'FAIL'} {response.code} {cache:7} {len(body):>9} bytes  "
                  f"duration {probe.stdout.strip() or '?'} s  {path}", flush=True)
        return failures

    return Deferred.fromCoroutine(run())


def demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="h264edge demo", description=__doc__)
    parser.add_argument("--dir", default="h264edge-demo", help="where the sample origin files and cache go")
    parser.add_argument("--port", type=int, default=8080, help="edge port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--origin-port", type=int, default=0, help="origin port on 127.0.0.1 (0 = any)")
    parser.add_argument("--max-size", default="1G", help="cache size bound")
    parser.add_argument("--check", action="store_true", help="request the samples through the edge, verify, exit")
    args = parser.parse_args(argv)

    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    from twisted.python import log as twisted_log
    from twisted.web.server import Site
    from twisted.web.static import File

    from h264edge.origin import OriginClient
    from h264edge.store import SliceStore
    from h264edge.tap import parse_size, quiet_hachoir
    from h264edge.web.resource import EdgeResource

    quiet_hachoir()
    origin_dir = os.path.join(args.dir, "origin")
    make_samples(origin_dir)
    if not args.check:
        twisted_log.startLogging(sys.stdout)
    class DemoOrigin(File):
        """A static file origin that says how long its answers stay fresh (an hour), as origins should."""

        def render(self, request: Any) -> Any:
            request.setHeader(b"Cache-Control", b"public, max-age=3600")
            return super().render(request)

    origin_site = Site(DemoOrigin(origin_dir))
    origin_port = reactor.listenTCP(args.origin_port, origin_site, interface="127.0.0.1")
    origin_url = f"http://127.0.0.1:{origin_port.getHost().port}/"
    store = SliceStore(os.path.join(args.dir, "cache"), max_size=parse_size(args.max_size))
    for _ in store.rebuild_steps():
        pass
    edge = EdgeResource(store, OriginClient([origin_url]))
    edge_port = reactor.listenTCP(args.port, Site(edge), interface="127.0.0.1")
    edge_url = f"http://127.0.0.1:{edge_port.getHost().port}"
    print(f"origin: {origin_url} (serving {origin_dir})")
    print(f"edge:   {edge_url}  (cache in {os.path.join(args.dir, 'cache')})")
    print(f"try:    curl -o whole.mp4 {edge_url}/sample.mp4")
    print(f"        ffplay '{edge_url}/sample.mp4?start=30'")
    print(f"        curl -o clip.mp4 '{edge_url}/sample.mp4?start=12.5&end=20'")
    flv_offset = flv_keyframe(os.path.join(origin_dir, "sample.flv"))
    print(f"        curl -o seek.flv '{edge_url}/sample.flv?start={flv_offset}'", flush=True)
    result: dict[str, Optional[int]] = {"code": 0}
    if args.check:
        d = _check(edge_url, reactor, flv_offset)

        def done(failures: Any) -> None:
            result["code"] = 1 if not isinstance(failures, int) or failures else 0
            if not isinstance(failures, int):
                print(failures)
            store.close()
            reactor.stop()

        d.addBoth(done)
    reactor.run()
    store.close()
    return result["code"] or 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        return demo(argv[1:])
    print("usage: h264edge demo [--check] [--port N] [--dir DIR]\n"
          "       twistd -n h264edge --origin=URL ...   (the server; see twistd h264edge --help)")
    return 2 if argv and argv[0] not in ("-h", "--help") else 0


if __name__ == "__main__":
    raise SystemExit(main())
