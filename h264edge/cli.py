# -*- test-case-name: tests.test_cli -*-
"""
The C{h264edge} command: C{serve} (the server, as C{twistd -n h264edge}), C{demo}, C{prewarm},
C{purge} and C{check-config}.

C{h264edge demo} runs an edge in front of a local origin that serves generated sample clips:
nothing to start by hand; the clips are made with ffmpeg on first run, a Twisted static file server
plays the origin on 127.0.0.1, and the edge listens beside it.  C{--check} makes a few requests
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


def _check(edge_url: str, admin_url: str, reactor: Any, flv_offset: int) -> "Any":
    """Fetch the sample whole and seeked through the edge; verify with ffprobe; then the pages."""
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
        for url, wanted in ((f"{admin_url}/metrics", b"h264edge_requests_total{"), (f"{admin_url}/status", b"<svg"),
                            (f"{edge_url}/player?src=/sample.mp4", b'data-src="/sample.mp4"')):
            response = await treq.get(url, reactor=reactor)
            body = await response.content()
            ok = response.code == 200 and wanted in body
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {response.code} page {url}", flush=True)
        return failures

    return Deferred.fromCoroutine(run())


def demo_parser() -> argparse.ArgumentParser:
    """C{h264edge demo}'s options."""
    parser = argparse.ArgumentParser(prog="h264edge demo", description=DEMO_HELP)
    parser.add_argument("--dir", default="h264edge-demo", help="where the sample origin files and cache go")
    parser.add_argument("--port", type=int, default=8080, help="edge port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--origin-port", type=int, default=0, help="origin port on 127.0.0.1 (0 = any)")
    parser.add_argument("--admin-port", type=int, default=8081,
                        help="admin listener (/status, /metrics, ...) port on 127.0.0.1 (0 = any)")
    parser.add_argument("--max-size", default="1G", help="cache size bound")
    parser.add_argument("--check", action="store_true", help="request the samples through the edge, verify, exit")
    return parser


def demo(argv: list[str]) -> int:
    args = demo_parser().parse_args(argv)

    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    from twisted.python import log as twisted_log
    from twisted.web.server import Site
    from twisted.web.static import File

    from h264edge.metrics import EdgeMetrics
    from h264edge.origin import OriginClient
    from h264edge.store import SliceStore
    from h264edge.tap import MetricsUpkeep, observe, parse_size, quiet_hachoir
    from h264edge.web.admin import admin_resource
    from h264edge.web.hot import EdgeSite
    from h264edge.web.player import PlayerPage, ViewerRoot
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
    origin = OriginClient([origin_url])
    edge = EdgeResource(store, origin, hot_bytes=16 * 2**20)
    site = EdgeSite(ViewerRoot(edge, PlayerPage()), edge.hot)
    metrics = EdgeMetrics(store, lambda: origin.bases)
    observe(metrics, store, origin, site, edge)
    upkeep = MetricsUpkeep(metrics)
    upkeep.startService()
    edge_port = reactor.listenTCP(args.port, site, interface="127.0.0.1")
    edge_url = f"http://127.0.0.1:{edge_port.getHost().port}"
    admin = Site(admin_resource(edge, metrics))
    admin.log = lambda request: None  # type: ignore[method-assign]
    admin_port = reactor.listenTCP(args.admin_port, admin, interface="127.0.0.1")
    admin_url = f"http://127.0.0.1:{admin_port.getHost().port}"
    print(f"origin: {origin_url} (serving {origin_dir})")
    print(f"edge:   {edge_url}  (cache in {os.path.join(args.dir, 'cache')})")
    print(f"admin:  {admin_url}/status  (and /metrics, /healthz, /readyz, POST /purge?path=)")
    print(f"watch:  {edge_url}/player?src=/sample.mp4")
    print(f"try:    curl -o whole.mp4 {edge_url}/sample.mp4")
    print(f"        ffplay '{edge_url}/sample.mp4?start=30'")
    print(f"        curl -o clip.mp4 '{edge_url}/sample.mp4?start=12.5&end=20'")
    flv_offset = flv_keyframe(os.path.join(origin_dir, "sample.flv"))
    print(f"        curl -o seek.flv '{edge_url}/sample.flv?start={flv_offset}'", flush=True)
    result: dict[str, Optional[int]] = {"code": 0}
    if args.check:
        d = _check(edge_url, admin_url, reactor, flv_offset)

        def done(failures: Any) -> None:
            result["code"] = 1 if not isinstance(failures, int) or failures else 0
            if not isinstance(failures, int):
                print(failures)
            store.close()
            reactor.stop()

        d.addBoth(done)
    reactor.run()
    upkeep.stopService()
    store.close()
    return result["code"] or 0


DEMO_HELP = (
    "Run an edge in front of a local origin serving generated sample clips (made with ffmpeg on the "
    "first run), both on 127.0.0.1, and print URLs to try. With --check, request the samples through "
    "the edge, check them with ffprobe, and exit."
)

COMMANDS = {
    "serve": "run the edge server (twistd -n h264edge OPTIONS; 'h264edge serve --help' lists the options)",
    "demo": "an edge and a sample origin on 127.0.0.1, to try it out",
    "prewarm": "pull a list of clips into a running edge, with a progress bar",
    "purge": "drop paths (or prefixes) from a running edge's cache through its admin listener",
    "check-config": "check the server's options (and --config file) without starting it",
}


def _parser() -> argparse.ArgumentParser:
    from h264edge import __version__

    parser = argparse.ArgumentParser(
        prog="h264edge",
        description="An edge cache server for H.264/MP4 video, with ?start= seeking.",
        epilog="Run 'h264edge COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"h264edge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def serve(argv: list[str]) -> int:
    """The server in the foreground: twistd's own code, with the h264edge plugin and these options."""
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "h264edge", *argv]
    run()
    return 0


def check_config(argv: list[str]) -> int:
    """Parse the server's options (and --config) and check the directories and files they name."""
    from twisted.python import usage

    from h264edge.lifecycle import StartupRefused
    from h264edge.tap import Options, check_paths

    options = Options()
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: h264edge check-config [SERVER OPTIONS...]\n\n"
              "Checks the options 'h264edge serve' would get (including a --config file) and the "
              "directories and files they name, without starting anything; exits 1 on the first problem.")
        return 0
    try:
        options.parseOptions(argv)
        check_paths(options)
    except usage.UsageError as e:
        print(f"h264edge: {e}", file=sys.stderr)
        return 1
    except StartupRefused as e:
        print(e, file=sys.stderr)
        return 1
    print("configuration ok:")
    for name in sorted(options):
        if name not in ("listen-fd", "tcp-listen", "config") or options[name] is not None:
            print(f"  {name} = {options[name]!r}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    if not argv:
        parser.print_help()
        return 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "demo":
        return demo(rest)
    if command == "check-config":
        return check_config(rest)
    if command in ("prewarm", "purge"):
        from h264edge import prewarm

        return int(getattr(prewarm, command)(rest))
    parser.parse_args(argv)  # --help, --version, or an unknown command (exits 2 with a usage line)
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
