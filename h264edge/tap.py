# -*- test-case-name: tests.test_tap -*-
"""
C{twistd h264edge}: command-line options and the service graph (index loader + HTTP site).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from twisted.application import service, strports
from twisted.internet import task
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from h264edge.origin import OriginClient
from h264edge.store import SliceStore
from h264edge.web.resource import EdgeResource

log = Logger()

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(value: str) -> int:
    """C{"50G"} -> bytes; suffixes K, M, G, T are powers of 1024."""
    match = _SIZE.match(value)
    if match is None:
        raise usage.UsageError(f"{value!r} is not a size (examples: 512M, 50G, 1T)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


class Options(usage.Options):
    synopsis = "--origin=URL [--origin=URL2 ...] [options]"
    longdesc = (
        "Serve H.264/MP4 (and any other) files from ORIGIN through a local disk cache, with "
        "pseudo-streaming seeks: clip.mp4?start=SECONDS[&end=SECONDS] and clip.flv?start=BYTES."
    )
    optParameters = [
        ["cache-dir", "d", "/var/cache/h264edge", "Directory of the disk cache (created if missing)."],
        ["max-size", "s", "10G", "Bytes of disk the cache may use (K/M/G/T suffixes)."],
        ["listen", "l", "tcp:8080", "Where to listen for viewers (a Twisted endpoint description)."],
        ["slice-size", None, "1M", "Cache objects are kept in slices of this many bytes."],
        ["default-ttl", None, "3600", "Seconds an answer stays fresh when the origin says nothing."],
        ["origin-timeout", None, "10", "Seconds to wait for an origin to connect or answer."],
        ["seek-cache", None, "256M", "Memory for parsed MP4 seek indexes (K/M/G suffixes)."],
        ["max-moov", None, "64M", "Largest MP4 moov box the edge will parse for a seek."],
    ]
    optFlags = [
        ["ignore-query", None, "Leave the query string out of the cache key (tracking parameters)."],
        ["exact-seek", None, "Start MP4 seeks exactly at start= (lead-in hidden by an edit list)."],
        ["no-sync", None, "Do not fsync before recording slices as present (faster, less crash-safe)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["origins"] = []
        self["pass-methods"] = []

    def opt_origin(self, url: str) -> None:
        """Origin base URL; give it several times for failover in order."""
        if not url.startswith(("http://", "https://")):
            raise usage.UsageError(f"--origin={url!r} must be an http:// or https:// URL")
        self["origins"].append(url)

    def opt_pass_method(self, method: str) -> None:
        """Forward this HTTP method to the origin uncached (repeatable)."""
        if not method.isalpha():
            raise usage.UsageError(f"--pass-method={method!r} is not a method name")
        self["pass-methods"].append(method.upper())

    def postOptions(self) -> None:
        if not self["origins"]:
            raise usage.UsageError("--origin=URL is required")
        for name in ("max-size", "slice-size", "seek-cache", "max-moov"):
            self[name] = parse_size(self[name])
        for name in ("default-ttl", "origin-timeout"):
            try:
                self[name] = float(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name} must be a number of seconds") from None
        if self["slice-size"] < 64 * 1024:
            raise usage.UsageError("--slice-size must be at least 64K")


class IndexLoader(service.Service):
    """Rebuilds the store's LRU index from disk in the background; the edge serves meanwhile."""

    def __init__(self, store: SliceStore) -> None:
        self.store = store
        self._task: Optional[task.CooperativeTask] = None

    def startService(self) -> None:
        super().startService()
        self._task = task.cooperate(self.store.rebuild_steps())
        d = self._task.whenDone()
        d.addCallback(lambda _: log.info("cache index loaded: {n} objects", n=len(self.store)))
        d.addErrback(lambda f: None if f.check(task.TaskStopped) else log.failure("index rebuild failed", f))

    def stopService(self) -> Any:
        if self._task is not None:
            try:
                self._task.stop()
            except (task.TaskDone, task.TaskFailed, task.TaskStopped):
                pass
        self.store.close()
        return super().stopService()


def quiet_hachoir() -> None:
    """hachoir prints warnings about odd bytes to stderr; a server reports errors as HTTP answers."""
    import hachoir.core.config

    hachoir.core.config.quiet = True


def makeService(options: Options) -> service.MultiService:
    quiet_hachoir()
    top = service.MultiService()
    store = SliceStore(
        options["cache-dir"],
        max_size=options["max-size"],
        slice_size=options["slice-size"],
        sync=not options["no-sync"],
    )
    origin = OriginClient(options["origins"], timeout=options["origin-timeout"])
    resource = EdgeResource(
        store,
        origin,
        default_ttl=options["default-ttl"],
        seek_cache_bytes=options["seek-cache"],
        max_moov=options["max-moov"],
        keep_query=not options["ignore-query"],
        pass_methods=options["pass-methods"],
        exact_seek=options["exact-seek"],
    )
    IndexLoader(store).setServiceParent(top)
    site = Site(resource)
    site.displayTracebacks = False
    strports.service(options["listen"], site).setServiceParent(top)  # type: ignore[arg-type]
    return top
