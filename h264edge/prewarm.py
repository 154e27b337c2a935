# -*- test-case-name: tests.test_prewarm -*-
"""
C{h264edge prewarm} and C{h264edge purge}: an operator's clients of a running edge.

C{prewarm URLS-FILE --edge URL} asks the edge for a list of clips (whole, a byte range, or a seek),
a few at a time, reading every answer to its end so the edge caches it, with a progress bar (bytes,
clips, rate, time left) and a summary of bytes, hits, misses and errors.  Each line of the file is
a path on the edge (C{/clip.mp4}, C{/clip.mp4?start=30}), or a URL whose path and query are taken,
optionally followed by a range (C{bytes=0-1048575}); C{#} starts a comment.

C{purge --admin URL PATH...} (or C{--prefix PREFIX...}) asks the admin listener's purge API.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Callable, Optional
from urllib.parse import quote, urlsplit

from attrs import define, field

PREWARM_HELP = (
    "Pull a list of clips into a running edge: each line of URLS-FILE ('-' for standard input) is a path "
    "on the edge (/clip.mp4, /clip.mp4?start=30) or a URL whose path is taken, optionally followed by a "
    "byte range (bytes=0-1048575); '#' starts a comment. Every answer is read to its end, a few at a time. "
    "Exits 1 if any request failed."
)
PURGE_HELP = (
    "Drop objects from a running edge's cache through its admin listener's purge API: each PATH with "
    "every query variant of it (and the seeks made from it), or with --prefix every object under each "
    "prefix. Exits 1 if any purge failed."
)
_RANGE = re.compile(r"bytes=\d{1,19}-\d{0,19}|bytes=-\d{1,19}")
READ_SIZE = 256 * 1024


@define
class Pull:
    """One line of the list: a target on the edge, and a byte range or None."""

    target: str
    byte_range: Optional[str] = None


@define
class Tally:
    """What a prewarm did; updated from worker threads under C{lock}."""

    bytes: int = 0
    clips: int = 0
    hits: int = 0
    misses: int = 0
    errors: list[str] = field(factory=list)
    lock: threading.Lock = field(factory=threading.Lock)


def read_list(lines: IO[str]) -> list[Pull]:
    """The pulls of a URLS-FILE; ValueError names a line that is not one."""
    pulls = []
    for number, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        words = text.split()
        if len(words) > 2 or (len(words) == 2 and not _RANGE.fullmatch(words[1])):
            raise ValueError(f"line {number}: {raw.strip()!r}: a path or URL, then optionally bytes=FIRST-LAST")
        target = words[0]
        if target.startswith(("http://", "https://")):
            parts = urlsplit(target)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if not target.startswith("/"):
            raise ValueError(f"line {number}: {target!r} is not a path (/clip.mp4) or an http(s) URL")
        pulls.append(Pull(quote(target, safe="/?&=%:+,;@!$'()*~.-_"), words[1] if len(words) == 2 else None))
    return pulls


class Edge:
    """One keep-alive HTTP connection per thread to the edge at C{base} (http://host:port)."""

    def __init__(self, base: str, timeout: float) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--edge={base!r} is not an http(s)://host[:port] URL")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.timeout = timeout
        self._local = threading.local()

    def connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            factory = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = factory(self.host, self.port, timeout=self.timeout)
        return conn

    def drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None


def pull(edge: Edge, item: Pull, tally: Tally, on_bytes: Callable[[int], None],
         on_length: Callable[[int], None]) -> None:
    """GET one item and read its body to the end, counting into C{tally}."""
    headers = {"User-Agent": "h264edge-prewarm"}
    if item.byte_range:
        headers["Range"] = item.byte_range
    what = item.target + (f" ({item.byte_range})" if item.byte_range else "")
    try:
        conn = edge.connection()
        conn.request("GET", item.target, headers=headers)
        response = conn.getresponse()
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit():
            on_length(int(length))
        got = 0
        while True:
            data = response.read(READ_SIZE)
            if not data:
                break
            got += len(data)
            on_bytes(len(data))
        cache = response.getheader("X-Cache", "-")
        if response.status >= 400:
            raise _Failed(f"{what}: {response.status} {response.reason}")
        if length is not None and length.isdigit() and got != int(length):
            raise _Failed(f"{what}: {got} of {length} bytes")
        if response.getheader("Connection", "").lower() == "close":
            edge.drop()
    except (OSError, http.client.HTTPException, _Failed) as e:
        edge.drop()
        with tally.lock:
            tally.clips += 1
            tally.errors.append(str(e) if isinstance(e, _Failed) else f"{what}: {e.__class__.__name__}: {e}")
        return
    with tally.lock:
        tally.clips += 1
        tally.bytes += got
        if cache == "HIT":
            tally.hits += 1
        else:
            tally.misses += 1


class _Failed(Exception):
    pass


def prewarm_parser() -> argparse.ArgumentParser:
    """C{h264edge prewarm}'s options."""
    parser = argparse.ArgumentParser(prog="h264edge prewarm", description=PREWARM_HELP)
    parser.add_argument("urls_file", metavar="URLS-FILE", help="the list of clips ('-' for standard input)")
    parser.add_argument("--edge", required=True, help="the edge's viewer URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--concurrency", type=int, default=4, help="requests at a time (default 4)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without a byte before a request fails")
    parser.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                        help="the progress bar: on a terminal (auto), always, or never")
    return parser


def prewarm(argv: list[str]) -> int:
    parser = prewarm_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.concurrency <= 256:
        parser.error("--concurrency must be between 1 and 256")
    try:
        edge = Edge(args.edge, args.timeout)
        if args.urls_file == "-":
            pulls = read_list(sys.stdin)
        else:
            with open(args.urls_file, encoding="utf-8") as f:
                pulls = read_list(f)
    except (OSError, ValueError) as e:
        print(f"h264edge prewarm: {e}", file=sys.stderr)
        return 2
    tally = run(edge, pulls, args.concurrency, args.progress)
    print(f"{tally.clips} clips, {tally.bytes} bytes ({_size(tally.bytes)}): {tally.hits} hits, "
          f"{tally.misses} misses, {len(tally.errors)} errors")
    for error in tally.errors[:20]:
        print(f"  error: {error}")
    if len(tally.errors) > 20:
        print(f"  ... and {len(tally.errors) - 20} more errors")
    return 1 if tally.errors else 0


def run(edge: Edge, pulls: list[Pull], concurrency: int, progress: str = "auto") -> Tally:
    """Pull every item, C{concurrency} at a time, with a rich progress bar (unless C{progress} says never)."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    console = Console(stderr=False, force_terminal=True if progress == "always" else None)
    tally = Tally()
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), DownloadColumn(),
        TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=progress == "never" or (progress == "auto" and not console.is_terminal),
        transient=False, refresh_per_second=5,
    )
    # the bar counts clips; bytes go to a second task whose total grows as answers tell their length
    with bar:
        clips = bar.add_task("clips", total=len(pulls))
        data = bar.add_task("bytes", total=0)
        lengths = {"total": 0}
        lock = threading.Lock()

        def on_length(count: int) -> None:
            with lock:
                lengths["total"] += count
                bar.update(data, total=lengths["total"])

        def on_bytes(count: int) -> None:
            bar.advance(data, count)

        def one(item: Pull) -> None:
            pull(edge, item, tally, on_bytes, on_length)
            bar.advance(clips, 1)

        with ThreadPoolExecutor(concurrency) as pool:
            for _ in pool.map(one, pulls):
                pass
    return tally


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count} B"


def purge_parser() -> argparse.ArgumentParser:
    """C{h264edge purge}'s options."""
    parser = argparse.ArgumentParser(prog="h264edge purge", description=PURGE_HELP)
    parser.add_argument("targets", metavar="PATH", nargs="+", help="paths (or, with --prefix, path prefixes)")
    parser.add_argument("--admin", required=True, help="the admin listener's URL, e.g. http://127.0.0.1:9080")
    parser.add_argument("--prefix", action="store_true", help="purge everything under each prefix")
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token", help="the admin token (visible in the process list: prefer --token-file)")
    token.add_argument("--token-file", help="a file whose first line is the admin token")
    return parser


def purge(argv: list[str]) -> int:
    parser = purge_parser()
    args = parser.parse_args(argv)
    secret = args.token
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                secret = f.readline().strip()
        except OSError as e:
            print(f"h264edge purge: --token-file={args.token_file}: {e.strerror}", file=sys.stderr)
            return 2
    parts = urlsplit(args.admin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        parser.error(f"--admin={args.admin!r} is not an http(s)://host[:port] URL")
    factory = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    failed = 0
    for target in args.targets:
        query = ("prefix=" if args.prefix else "path=") + quote(target, safe="/")
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        conn = factory(parts.hostname, parts.port, timeout=30)
        try:
            conn.request("POST", f"/purge?{query}", headers=headers)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as e:
            print(f"{target}: {e.__class__.__name__}: {e}", file=sys.stderr)
            failed += 1
            continue
        finally:
            conn.close()
        try:
            answer = json.loads(body)
        except ValueError:
            answer = {"error": body.decode("utf-8", "replace").strip()[:200]}
        if response.status != 200:
            print(f"{target}: {response.status} {answer.get('error', '')}", file=sys.stderr)
            failed += 1
        else:
            print(f"{target}: purged {answer['purged']} objects")
    return 1 if failed else 0
