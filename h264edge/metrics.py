# -*- test-case-name: tests.test_admin -*-
"""
The edge's figures for operators: Prometheus metrics (prometheus_client), and what the status page
shows (top clips, origin health, recent errors, the last minutes' rates).

L{EdgeMetrics} is told about every answer by the viewer site (L{h264edge.web.hot.EdgeSite}) and is
the L{EdgeObserver} of the origin client, the fill and the store.  Answers are tallied in plain
Python counters (a hot-path answer costs a method call and two additions) and moved into the
Prometheus metrics by L{EdgeMetrics.flush}: every second, and before every scrape.

With C{--workers}, every process writes its metrics to files in one directory (prometheus_client's
multiprocess mode) and the admin listener of the first process serves them summed.  The status
page's top clips, origin health and recent errors are that first process's own.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import time
from typing import Any, Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import Metric
from twisted.logger import Logger

from h264edge import __version__
from h264edge.observer import EdgeObserver
from h264edge.web.answers import Answer
from h264edge.web.http import FLV_EXTENSIONS, MP4_EXTENSIONS

log = Logger()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
METHODS = frozenset({"GET", "HEAD", "PURGE", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
_CACHE_STATUS = re.compile(r"[A-Z][A-Z_-]{0,23}")
_SEEK = re.compile(rb"(?:^|&)(?:start|end)=(?!0*(?:\.0*)?(?:&|$))")
TOP_KEEP = 2000  # clips kept in the top list between flushes (the least requested go first)
HISTORY = 120  # samples of the rates, one per HISTORY_STEP seconds
HISTORY_STEP = 5.0
RECENT_ERRORS = 100


class OriginRecord:
    """What one origin base did lately, as the answers and probes the metrics saw tell it."""

    def __init__(self) -> None:
        self.answered = 0
        self.errors = 0
        self.ok_at: Optional[float] = None
        self.failed_at: Optional[float] = None
        self.last_error = ""

    @property
    def state(self) -> str:
        if self.failed_at is None:
            return "up" if self.ok_at is not None else "unknown"
        if self.ok_at is None or self.failed_at > self.ok_at:
            return "down"
        return "up"


class EdgeMetrics(EdgeObserver):
    """
    @param store: the L{SliceStore} (for cache size figures).
    @param bases: a function returning the current origin base URLs (they may change on SIGHUP).
    @param multiprocess_dir: the directory of prometheus_client's multiprocess mode (C{--workers}),
        or None for one process.  Set it before any other process writes there.
    @param collector: whether this process serves the figures (with C{multiprocess_dir}: the first
        process sums everyone's files).
    """

    def __init__(
        self,
        store: Any,
        bases: Callable[[], Iterable[str]],
        clock: Any = None,
        multiprocess_dir: Optional[str] = None,
        collector: bool = True,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[no-redef]
        self.store = store
        self.bases = bases
        self.clock = clock
        self.multiprocess_dir = multiprocess_dir
        self.collector = collector
        self.started_at = clock.seconds()
        self.event_log: Any = None  # a twisted.logger Logger for structured events (see tap)
        if multiprocess_dir is not None:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiprocess_dir
            values.ValueClass = values.get_value_class()  # chosen at import: choose again
        own = CollectorRegistry(auto_describe=True)
        self._own = own
        self.requests = Counter("h264edge_requests", "Answers to viewers, by method, cache status and status code",
                                ["method", "cache", "code"], registry=own)
        self.sent = Counter("h264edge_sent_bytes", "Body bytes sent to viewers, by cache status", ["cache"],
                            registry=own)
        self.cut = Counter("h264edge_cut_answers", "Answers that ended before their whole body went out "
                           "(the viewer left, or the connection was dropped)", registry=own)
        self.first_byte = Histogram("h264edge_first_byte_seconds", "Time from a request to its answer's first "
                                    "byte (answers of the normal road; hot-path answers leave within the read "
                                    "that brought the request)", buckets=LATENCY_BUCKETS, registry=own)
        self.seeks = Counter("h264edge_seek_answers", "Answers to ?start=/end= seeks, by container", ["container"],
                             registry=own)
        self.origin_requests = Counter("h264edge_origin_requests", "Origin answers by origin and status code",
                                       ["origin", "code"], registry=own)
        self.origin_bytes_total = Counter("h264edge_origin_bytes", "Body bytes received from each origin",
                                          ["origin"], registry=own)
        self.origin_errors = Counter("h264edge_origin_errors", "Failed origin requests and bodies, by origin and "
                                     "kind (timeout, connect, status_5xx, encoded, body_cut)", ["origin", "kind"],
                                     registry=own)
        self.fill_latency = Histogram("h264edge_fill_latency_seconds", "Time from an origin request to its "
                                      "answer's headers", ["origin"], buckets=LATENCY_BUCKETS, registry=own)
        self.fills = Counter("h264edge_fills", "Origin fetches that ended, by result (done, failed)", ["result"],
                             registry=own)
        self.admissions = Counter("h264edge_cache_admissions", "Objects admitted into the disk cache",
                                  registry=own)
        self.evictions = Counter("h264edge_cache_evictions", "Objects evicted to stay under --max-size",
                                 registry=own)
        self.evicted_bytes = Counter("h264edge_cache_evicted_bytes", "Bytes of the objects evicted", registry=own)
        self.purged = Counter("h264edge_purged_objects", "Objects dropped by purges, by way (viewer PURGE, admin API)",
                              ["via"], registry=own)
        self.cache_bytes = Gauge("h264edge_cache_bytes", "Bytes of the disk cache in use",
                                 multiprocess_mode="livemax", registry=own)
        self.cache_objects = Gauge("h264edge_cache_objects", "Objects in the disk cache's index",
                                   multiprocess_mode="livemax", registry=own)
        self.cache_max_bytes = Gauge("h264edge_cache_max_bytes", "The disk cache's size bound (--max-size)",
                                     multiprocess_mode="livemax", registry=own)
        self.connections = Gauge("h264edge_open_connections", "Viewer connections open",
                                 multiprocess_mode="livesum", registry=own)
        self.info = Gauge("h264edge_info", "The running version", ["version"], multiprocess_mode="livemax",
                          registry=own)
        self.info.labels(__version__).set(1)
        self.start_time = Gauge("h264edge_start_time_seconds", "When the (first) process started, Unix time",
                                multiprocess_mode="livemin", registry=own)
        self.start_time.set(time.time())
        if multiprocess_dir is None:
            from prometheus_client import PROCESS_COLLECTOR, PLATFORM_COLLECTOR

            own.register(PROCESS_COLLECTOR)
            own.register(PLATFORM_COLLECTOR)
            self.registry = own
        else:
            from prometheus_client.multiprocess import MultiProcessCollector

            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry, path=multiprocess_dir)
        self.connection_counts: list[Callable[[], int]] = []  # functions counting open viewer connections
        # tallies moved into the metrics by flush()
        self._answers: dict[tuple[str, str, str], int] = collections.defaultdict(int)
        self._sent: dict[str, int] = collections.defaultdict(int)
        #: hot-path answers since the last flush: target -> [answers, bytes] (the site adds to it in place)
        self.hot_tally: dict[bytes, list[int]] = {}
        self._top: dict[str, list[int]] = {}
        self.origins: dict[str, OriginRecord] = {}
        self.errors: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=RECENT_ERRORS)
        self.history: collections.deque[tuple[float, float, float, float, float]] = collections.deque(maxlen=HISTORY)
        self._base_of: dict[str, str] = {}

    # -- answers (the viewer site) ----------------------------------------------------------------

    def answered(self, answer: Answer) -> None:
        method = answer.method.decode("latin-1")
        if method not in METHODS:
            method = "other"
        cache = answer.cache if _CACHE_STATUS.fullmatch(answer.cache) else ("NONE" if answer.cache == "-" else "other")
        self._answers[(method, cache, str(answer.code))] += 1
        self._sent[cache] += answer.sent
        if answer.cut:
            self.cut.inc()
        if answer.first_byte is not None:
            self.first_byte.observe(answer.first_byte)
        path, _, query = answer.uri.partition(b"?")
        lower = path.lower()
        if query and answer.code in (200, 206) and _SEEK.search(query):
            if lower.endswith(tuple(e.encode() for e in MP4_EXTENSIONS)):
                self.seeks.labels("mp4").inc()
            elif lower.endswith(tuple(e.encode() for e in FLV_EXTENSIONS)):
                self.seeks.labels("flv").inc()
        if method in ("GET", "HEAD") and answer.code < 400:
            top = self._top.get(path.decode("latin-1"))
            if top is None:
                top = self._top[path.decode("latin-1")] = [0, 0]
            top[0] += 1
            top[1] += answer.sent
        if answer.code >= 500:
            self._error("answer", f"{answer.code} for {answer.method.decode('latin-1')} "
                                  f"{answer.uri.decode('latin-1')[:200]}")

    def hot_answered(self, uri: bytes, length: int) -> None:
        """
        A 200 HIT of C{length} body bytes from the hot path: tallied only (see L{flush}).  The site
        does the same inline, on L{hot_tally}, to spare a call.
        """
        tally = self.hot_tally.get(uri)
        if tally is None:
            tally = self.hot_tally[uri] = [0, 0]
        tally[0] += 1
        tally[1] += length

    def purges(self, count: int, via: str, what: str = "") -> None:
        self.purged.labels(via).inc(count)
        self._event("purge", via=via, target=what, objects=count)

    # -- the observer of the origin client, the fill and the store ------------------------------

    def origin_answered(self, base: str, code: int, seconds: float) -> None:
        self.origin_requests.labels(base, str(code)).inc()
        self.fill_latency.labels(base).observe(seconds)
        health = self._health(base)
        health.answered += 1
        if code < 500:
            health.ok_at = self.clock.seconds()

    def origin_failed(self, base: str, kind: str) -> None:
        base = self._base(base)
        self.origin_errors.labels(base, kind).inc()
        health = self._health(base)
        health.errors += 1
        if kind != "body_cut":
            health.failed_at = self.clock.seconds()
            health.last_error = kind
        self._error("origin", f"{base}: {kind}")
        self._event("origin_error", origin=base, kind=kind)

    def origin_probed(self, base: str, result: str) -> None:
        """The start-up probe (or a readiness probe) of C{base}: C{"HTTP ..."} or why it failed."""
        health = self._health(base)
        if result.startswith("HTTP"):
            health.ok_at = self.clock.seconds()
        else:
            health.failed_at = self.clock.seconds()
            health.last_error = result

    def origin_bytes(self, url: str, count: int) -> None:
        self.origin_bytes_total.labels(self._base(url)).inc(count)

    def fill_done(self, key: str, url: str, seconds: float) -> None:
        self.fills.labels("done").inc()
        self._event("fill", key=key, origin=self._base(url), seconds=round(seconds, 6))

    def fill_failed(self, key: str, why: str) -> None:
        self.fills.labels("failed").inc()
        self._error("fill", f"{key}: {why}")
        self._event("fill_failed", key=key, why=why)

    def admitted(self, key: str, size: int) -> None:
        self.admissions.inc()

    def evicted(self, key: str, size: int) -> None:
        self.evictions.inc()
        self.evicted_bytes.inc(size)
        self._event("eviction", key=key, bytes=size)

    def _health(self, base: str) -> OriginRecord:
        health = self.origins.get(base)
        if health is None:
            if len(self.origins) > 64:  # bases removed by reloads
                self.origins = {b: h for b, h in self.origins.items() if b in set(self.bases())}
            health = self.origins[base] = OriginRecord()
        return health

    def _base(self, url: str) -> str:
        """The origin base a URL is under ("other" if none is now)."""
        base = self._base_of.get(url)
        if base is None:
            base = next((b for b in self.bases() if url.startswith(b)), "other")
            if len(self._base_of) > 10_000:
                self._base_of.clear()
            self._base_of[url] = base
        return base

    def _error(self, kind: str, text: str) -> None:
        self.errors.append((self.clock.seconds(), kind, text))

    def _event(self, name: str, **fields: Any) -> None:
        if self.event_log is not None:
            self.event_log.info("{h264edge_event}", h264edge_event=name, **fields)

    # -- into the metrics --------------------------------------------------------------------------

    def flush(self) -> None:
        """Move the tallies into the Prometheus metrics, and set the gauges."""
        answers, self._answers = self._answers, collections.defaultdict(int)
        for labels, count in answers.items():
            self.requests.labels(*labels).inc(count)
        sent, self._sent = self._sent, collections.defaultdict(int)
        hot = self.hot_tally  # the site holds this very dict: emptied in place
        hot_count = hot_bytes = 0
        top = self._top
        for uri, tally in list(hot.items()):
            count, length = tally
            if not count:
                continue
            tally[0] = tally[1] = 0
            hot_count += count
            hot_bytes += length
            path = uri.partition(b"?")[0].decode("latin-1")
            entry = top.get(path)
            if entry is None:
                entry = top[path] = [0, 0]
            entry[0] += count
            entry[1] += length
        if len(hot) > 10_000:
            hot.clear()
        if hot_count:
            self.requests.labels("GET", "HIT", "200").inc(hot_count)
            sent["HIT"] = sent.get("HIT", 0) + hot_bytes
        for cache, count in sent.items():
            self.sent.labels(cache).inc(count)
        if len(top) > TOP_KEEP * 2:
            kept = sorted(top.items(), key=lambda item: item[1][0], reverse=True)[:TOP_KEEP]
            self._top = dict(kept)
        store = self.store
        self.cache_bytes.set(store.used_bytes)
        self.cache_objects.set(len(store))
        self.cache_max_bytes.set(store.max_size)
        self.connections.set(sum(count() for count in self.connection_counts))

    def render(self) -> bytes:
        """The Prometheus text exposition of every figure (of every process, with C{--workers})."""
        self.flush()
        if self.multiprocess_dir is not None:
            self._forget_dead_processes()
        return bytes(generate_latest(self.registry))

    def _forget_dead_processes(self) -> None:
        from prometheus_client import multiprocess

        assert self.multiprocess_dir is not None
        for path in glob.glob(os.path.join(self.multiprocess_dir, "gauge_live*_*.db")):
            pid_text = path.rsplit("_", 1)[1].removesuffix(".db")
            try:
                pid = int(pid_text)
                os.kill(pid, 0)
            except ProcessLookupError:
                multiprocess.mark_process_dead(pid, self.multiprocess_dir)
            except (ValueError, PermissionError):
                pass

    def families(self) -> dict[str, Metric]:
        """The collected metric families by name (after a flush), as the last L{render} saw them."""
        self.flush()
        return {family.name: family for family in self.registry.collect()}

    def totals(self) -> dict[str, float]:
        """The headline figures, summed from the same families /metrics shows."""
        families = self.families()

        def total(name: str, suffix: str = "_total", **match: str) -> float:
            family = families.get(name)
            if family is None:
                return 0.0
            return float(sum(sample.value for sample in family.samples if sample.name == name + suffix
                             and all(sample.labels.get(k) == v for k, v in match.items())))

        return {
            "requests": total("h264edge_requests"),
            "hits": total("h264edge_requests", cache="HIT"),
            "sent_bytes": total("h264edge_sent_bytes"),
            "origin_bytes": total("h264edge_origin_bytes"),
            "cut": total("h264edge_cut_answers"),
            "cache_bytes": total("h264edge_cache_bytes", ""),
            "cache_objects": total("h264edge_cache_objects", ""),
            "cache_max_bytes": total("h264edge_cache_max_bytes", ""),
            "connections": total("h264edge_open_connections", ""),
            "evictions": total("h264edge_cache_evictions"),
        }

    def sample(self) -> None:
        """Add a point to the history the status page charts (every L{HISTORY_STEP} seconds)."""
        t = self.totals()
        self.history.append((self.clock.seconds(), t["requests"], t["hits"], t["sent_bytes"], t["origin_bytes"]))

    def top(self, count: int = 10) -> dict[str, list[tuple[str, int, int]]]:
        """The most requested clips and those that sent the most bytes: (path, requests, bytes)."""
        self.flush()
        items = [(path, requests, sent) for path, (requests, sent) in self._top.items()]
        return {
            "by_requests": sorted(items, key=lambda item: (-item[1], item[0]))[:count],
            "by_bytes": sorted(items, key=lambda item: (-item[2], item[0]))[:count],
        }
