# -*- test-case-name: tests.test_pages -*-
"""
The demo player of the viewer listener: C{/player?src=/clip.mp4}, an HTML5 video of a clip the edge
serves, whose seeks past what the browser loaded reload C{src?start=T} (bundled page, no CDN).

L{ViewerRoot} puts it beside an L{EdgeResource}: the path C{/player} is the page, every other path
is the edge's.  C{--no-player} leaves the edge alone at the root.
"""

from __future__ import annotations

import html
import re
from typing import Any
from urllib.parse import parse_qs

from twisted.web.resource import Resource
from twisted.web.server import Request

from h264edge.web.http import BadRequest, excerpt, parse_target
from h264edge.web.status import asset

_SRC = re.compile(r"/[^\s\"'<>\\]{0,2047}")


def _plain(request: Request, code: int, text: str) -> bytes:
    body = (text + "\n").encode()
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    return body


class PlayerPage(Resource):
    """The page for C{?src=PATH}: a path on this edge (C{/...}, not another site), else 400."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.template = asset("player.html")

    def render_GET(self, request: Request) -> bytes:
        query = parse_qs(request.uri.partition(b"?")[2].decode("latin-1"))
        sources = query.get("src", [])
        if len(sources) != 1 or not _SRC.fullmatch(sources[0]) or sources[0].startswith("//"):
            return _plain(request, 400, "give the clip as src=/path/clip.mp4 (a path on this edge)")
        src = sources[0]
        path, _, rest = src.partition("?")
        try:
            parse_target(path.encode("utf-8"), rest.encode("utf-8"))  # characters of a path are UTF-8
        except BadRequest as e:
            return _plain(request, 400, f"src={excerpt(src)}: {e}")
        body = self.template.replace(b"{{src}}", html.escape(src, quote=True).encode())
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Security-Policy", b"default-src 'none'; media-src 'self'; "
                          b"script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:")
        return body


class ViewerRoot(Resource):
    """The viewer listener's root: C{/player} is the L{PlayerPage}, everything else C{edge}'s."""

    def __init__(self, edge: Any, player: PlayerPage) -> None:
        super().__init__()
        self.edge = edge
        self.player = player

    def getChildWithDefault(self, path: bytes, request: Request) -> Any:
        if path == b"player" and request.postpath == []:
            return self.player
        # the edge is mounted at the root: give back the segment Site took for this level
        if request.prepath:
            request.prepath.pop()
        request.postpath = [path, *(request.postpath or [])]
        return self.edge

    def render(self, request: Request) -> Any:  # type: ignore[override]
        return self.edge.render(request)
