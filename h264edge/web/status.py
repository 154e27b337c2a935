# -*- test-case-name: tests.test_pages -*-
"""
The status page of the admin listener: C{/status} (HTML), its script and style sheet (bundled in
C{h264edge/web/assets/}, nothing from a CDN), and C{/status.json}, the figures it shows.

The headline numbers come from the same metric families C{/metrics} shows (L{EdgeMetrics.totals}),
so the page and a scrape taken together agree; the chart is the rates between the samples the
metrics keep (one every few seconds, the last ten minutes).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from h264edge import __version__
from h264edge.metrics import EdgeMetrics

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
         ".css": b"text/css; charset=utf-8"}


def asset(name: str) -> bytes:
    with open(os.path.join(ASSETS, name), "rb") as f:
        return f.read()


class Asset(Resource):
    """One bundled file, read once."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.body = asset(name)
        self.content_type = TYPES[os.path.splitext(name)[1]]

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", self.content_type)
        request.setHeader(b"Content-Length", str(len(self.body)).encode())
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if self.content_type.startswith(b"text/html"):
            request.setHeader(b"Content-Security-Policy",
                              b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                              b"img-src 'self' data:")
        return self.body


def rates(history: list[tuple[float, float, float, float, float]]) -> list[dict[str, float]]:
    """Per-interval rates between consecutive samples (time, requests, hits, sent bytes, origin bytes)."""
    points = []
    for (t0, r0, h0, s0, o0), (t1, r1, h1, s1, o1) in zip(history, history[1:]):
        span = t1 - t0
        if span <= 0:
            continue
        requests = r1 - r0
        points.append({
            "time": t1,
            "requests_per_second": requests / span,
            "hit_ratio": (h1 - h0) / requests if requests > 0 else 0.0,
            "sent_bytes_per_second": (s1 - s0) / span,
            "origin_bytes_per_second": (o1 - o0) / span,
        })
    return points


def status(metrics: EdgeMetrics, origin: Any) -> dict[str, Any]:
    """What the status page shows, as one JSON-able value."""
    totals = metrics.totals()
    now = metrics.clock.seconds()
    origins = []
    circuits = getattr(origin, "health", None)
    for base in origin.bases:
        health = metrics.origins.get(base)
        circuit = circuits.states.get(base) if circuits is not None else None
        origins.append({
            "base": base,
            "state": health.state if health else "unknown",
            "answered": health.answered if health else 0,
            "errors": health.errors if health else 0,
            "last_error": health.last_error if health else "",
            "seconds_since_ok": None if health is None or health.ok_at is None else now - health.ok_at,
            "circuit": circuit.describe(now) if circuit is not None else "",
        })
    return {
        "version": __version__,
        "now": now,
        "uptime": now - metrics.started_at,
        "totals": {**totals, "hit_ratio": totals["hits"] / totals["requests"] if totals["requests"] else 0.0},
        "history": rates(list(metrics.history)),
        "top": metrics.top(10),
        "origins": origins,
        "errors": [{"time": t, "kind": kind, "text": text} for t, kind, text in reversed(metrics.errors)][:20],
    }


class StatusData(Resource):
    isLeaf = True

    def __init__(self, metrics: EdgeMetrics, origin: Any) -> None:
        super().__init__()
        self.metrics = metrics
        self.origin = origin

    def render_GET(self, request: Request) -> bytes:
        body = json.dumps(status(self.metrics, self.origin)).encode()
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        request.setHeader(b"Cache-Control", b"no-store")
        return body


def status_pages(metrics: EdgeMetrics, origin: Any) -> dict[bytes, Resource]:
    """The admin listener's children for the status page."""
    return {
        b"status": Asset("status.html"),
        b"status.js": Asset("status.js"),
        b"status.css": Asset("status.css"),
        b"status.json": StatusData(metrics, origin),
    }
