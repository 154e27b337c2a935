# -*- test-case-name: tests.test_edge -*-
"""
L{EdgeResource}: the edge as one twisted.web resource, embeddable in any Twisted app.

Each GET/HEAD becomes a L{Plan} (whole object, Range slice, MP4 or FLV seek, or a Range over a seek)
and goes out through one L{PlanProducer}.  Errors become one status and a short plain body.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Iterable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from h264edge import flv, mp4
from h264edge.errors import EdgeError, ObjectChanged, OriginStatus, OriginUnavailable
from h264edge.fill import Filler, FillFailed, SharedResult
from h264edge.origin import OriginClient
from h264edge.plan import Literal, Plan
from h264edge.store import CachedObject, SliceStore, StoreError
from h264edge.web.http import (
    BadRequest,
    Unsatisfiable,
    allowed_methods,
    not_modified,
    parse_byte_offset,
    parse_range,
    parse_seek,
    parse_target,
    range_applies,
    range_hint,
)
from h264edge.web.hot import HotAnswers
from h264edge.web.producer import PlanProducer

log = Logger()

MAX_TOP_LEVEL_BOXES = 4096
THREAD_MOOV_BYTES = 512 * 1024  # moov boxes at least this big are indexed in a thread


class MoovTooLarge(mp4.UnsupportedMP4):
    """The clip's moov is over the --max-moov cap: seeking it would cost too much memory."""


def _status_for(failure: Failure) -> tuple[int, str]:
    error = failure.value
    message = str(error) or error.__class__.__name__
    if isinstance(error, BadRequest):
        return 400, message
    if isinstance(error, (Unsatisfiable, mp4.SeekOutOfRange)):
        return 416, message
    if isinstance(error, flv.BadFLVOffset):
        return 400, message
    if isinstance(error, OriginStatus):
        return error.code, message
    if isinstance(error, OriginUnavailable):
        return (504 if error.timeout else 502), message
    if isinstance(error, mp4.UnsupportedMP4):
        return 501, "cannot seek in this MP4: " + message
    if isinstance(error, mp4.MalformedMP4):
        return 502, "the origin's MP4 is malformed: " + message
    if isinstance(error, flv.FLVError):
        return 502, "the origin's FLV is malformed: " + message
    if isinstance(error, (FillFailed, ObjectChanged)):
        return 502, message
    if isinstance(error, StoreError):
        return 503, "cache storage error: " + message
    if isinstance(error, EdgeError):
        return 500, message
    return 500, "internal error"


class EdgeResource(Resource):
    """
    The edge: GET and HEAD of any path, served from C{store} and filled from C{origin}.

    Embedding it::

        store = SliceStore("/var/cache/h264edge", max_size=50 * 2**30)
        origin = OriginClient(["http://origin.example:8000/"])
        root.putChild(b"video", EdgeResource(store, origin))

    @param keep_query: whether the query string (less start/end) is part of the cache key.
    @param pass_methods: methods forwarded uncached to the origin (others than GET/HEAD answer 405).
    @param exact_seek: start MP4 seeks exactly at C{start} (lead-in hidden by an edit list) rather than
        at the keyframe before it.
    """

    isLeaf = True

    def __init__(
        self,
        store: SliceStore,
        origin: OriginClient,
        *,
        reactor: Any = None,
        default_ttl: float = 3600.0,
        seek_cache_bytes: int = 256 * 2**20,
        max_moov: int = 64 * 2**20,
        keep_query: bool = True,
        pass_methods: Iterable[str] = (),
        exact_seek: bool = False,
        filler: Optional[Filler] = None,
        hot_bytes: int = 0,
    ) -> None:
        super().__init__()
        self.store = store
        self.origin = origin
        self.filler = filler or Filler(store, origin, reactor=reactor, default_ttl=default_ttl)
        self.indexes = mp4.SeekIndexCache(seek_cache_bytes)
        self.seek_plans = SeekPlanCache(seek_cache_bytes // 4)
        self.max_moov = max_moov
        self.keep_query = keep_query
        self.pass_methods = tuple(m.upper() for m in pass_methods)
        self.exact_seek = exact_seek
        self._parsing: dict[tuple[Any, ...], SharedResult] = {}
        #: answers to plain GETs of small complete objects, for L{EdgeSite}'s hot path (None: off)
        self.hot = HotAnswers(store, hot_bytes, reactor) if hot_bytes > 0 else None

    # -- dispatch -----------------------------------------------------------------------------

    def render(self, request: Request) -> Any:  # type: ignore[override]
        method = request.method.decode("ascii", "replace").upper()
        if method in ("GET", "HEAD"):
            d = Deferred.fromCoroutine(self._serve(request))
        elif method in self.pass_methods:
            d = Deferred.fromCoroutine(self._forward(request, method))
        elif method == "PURGE":
            return self._purge(request)
        else:
            request.setHeader(b"Allow", allowed_methods(self.pass_methods).encode())
            return self._plain(request, 405, f"{method} is not allowed here")
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _plain(self, request: Request, code: int, message: str) -> bytes:
        body = (message + "\n").encode("utf-8", "replace")
        if code != 416:
            request.responseHeaders.removeHeader(b"Content-Range")
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if not request.responseHeaders.hasHeader(b"X-Cache"):
            request.setHeader(b"X-Cache", b"MISS")
        return body

    def _failed(self, failure: Failure, request: Request) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        if request.startedWriting:
            log.failure("failed after the headers went out; dropping the connection", failure)
            if request.channel is not None and request.channel.transport is not None:
                request.channel.transport.abortConnection()
            return
        code, message = _status_for(failure)
        if code == 500:
            log.failure("internal error on {uri}", failure, uri=request.uri)
        body = self._plain(request, code, message)
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    # -- GET / HEAD ---------------------------------------------------------------------------

    async def _serve(self, request: Request) -> None:
        raw_path, _, raw_query = request.uri.partition(b"?")
        target = parse_target(raw_path, raw_query, self.keep_query)
        origin_path = target.path + ("?" + target.origin_query if target.origin_query else "")
        seek: Optional[tuple[float, Optional[float]]] = None
        flv_offset = 0
        if target.kind == "mp4":
            start, end = parse_seek(target.start, target.end)
            if start > 0 or end is not None:
                seek = (start, end)
        elif target.kind == "flv":
            flv_offset = parse_byte_offset(target.start)

        first, last = 0, None
        if seek is not None or flv_offset or request.method == b"HEAD":
            last = self.store.slice_size - 1  # the container head first; the rest follows the plan
        else:
            hint = range_hint(_h(request, b"Range"))
            if hint is not None:
                first, last = hint
        cached = self.store.get(target.key)
        existed = cached is not None
        obj = await self.filler.object_for(target.key, origin_path, first, last, cached=cached)
        meta = obj.meta

        etag, last_modified = meta.etag, meta.last_modified
        if seek is not None:
            index = await self._mp4_index(obj, origin_path)
            # an end at or past the last track's end keeps every sample, exactly as no end does; passing
            # a huge one on overflows the media-time arithmetic (end=1e308 was a 502)
            end = seek[1] if seek[1] is not None and seek[1] < index.duration else None
            plan_key = (target.key, meta.size, meta.etag, meta.last_modified, seek[0], end, self.exact_seek)
            plan = self.seek_plans.get(plan_key)
            if plan is None:
                plan = mp4.plan_for_seek(index, target.key, seek[0], end, self.exact_seek)
                self.seek_plans.put(plan_key, plan)
            etag = _derived_etag(obj, f"mp4:{seek[0]!r}:{end!r}:{self.exact_seek}")
        elif flv_offset:
            plan = await self._flv_plan(obj, origin_path, flv_offset)
            etag = _derived_etag(obj, f"flv:{flv_offset}")
        else:
            plan = Plan.whole(target.key, meta.size)

        if etag:
            request.setHeader(b"ETag", etag.encode("latin-1"))
        if last_modified:
            request.setHeader(b"Last-Modified", last_modified.encode("latin-1"))
        request.setHeader(b"Accept-Ranges", b"bytes")
        if not_modified(_h(request, b"If-None-Match"), _h(request, b"If-Modified-Since"), etag, last_modified):
            request.setHeader(b"X-Cache", b"HIT" if existed else b"MISS")
            request.setResponseCode(304)
            request.finish()
            return

        content_type = "video/mp4" if seek is not None and meta.content_type == "application/octet-stream" \
            else meta.content_type
        request.setHeader(b"Content-Type", content_type.encode("latin-1"))
        total = plan.length
        byte_range = None
        if range_applies(_h(request, b"If-Range"), etag, last_modified):
            try:
                byte_range = parse_range(_h(request, b"Range"), total)
            except Unsatisfiable:
                request.setHeader(b"Content-Range", f"bytes */{total}".encode())
                request.setHeader(b"X-Cache", b"HIT" if existed else b"MISS")
                raise
        if byte_range is not None:
            plan = plan.slice(*byte_range)
            request.setResponseCode(206)
            request.setHeader(b"Content-Range", f"bytes {byte_range[0]}-{byte_range[1]}/{total}".encode())
        cache_status = self._cache_status(obj, plan, existed)
        request.setHeader(b"X-Cache", cache_status.encode())
        request.setHeader(b"Content-Length", str(plan.length).encode())
        if request.method == b"HEAD" or plan.length == 0:
            request.finish()
            return
        if self.hot is not None and cache_status == "HIT" and byte_range is None and seek is None and not flv_offset \
                and request.method == b"GET":
            self.hot.record(request.uri, obj, request)
        producer = PlanProducer(request, plan, {target.key: obj}, {target.key: origin_path}, self.filler,
                                on_early_failure=lambda failure: self._failed(failure, request))
        request.notifyFinish().addErrback(lambda _: producer.stopProducing())
        producer.start()

    def _cache_status(self, obj: CachedObject, plan: Plan, existed: bool) -> str:
        if not existed:
            return "MISS"
        spans = list(plan.spans())
        ready = [self.filler.readable(obj, span.offset) >= span.length for span in spans]
        if all(ready):
            return "HIT"
        return "PARTIAL" if any(obj.available_from(s.offset) for s in spans) or any(ready) else "MISS"

    # -- containers -------------------------------------------------------------------------

    async def _mp4_index(self, obj: CachedObject, path: str) -> mp4.SeekIndex:
        meta = obj.meta
        cache_key = ("mp4", meta.key, meta.size, meta.etag, meta.last_modified)
        index = self.indexes.get(cache_key)
        if index is not None:
            return index
        shared = self._parsing.get(cache_key)
        if shared is None:
            d = Deferred.fromCoroutine(self._parse_mp4(obj, path))

            def done(result: Any) -> Any:
                self._parsing.pop(cache_key, None)
                if isinstance(result, mp4.SeekIndex):
                    self.indexes.put(cache_key, result)
                return result

            d.addBoth(done)  # before SharedResult, which consumes the result
            shared = self._parsing[cache_key] = SharedResult(d)
        result: mp4.SeekIndex = await shared.result()
        return result

    async def _parse_mp4(self, obj: CachedObject, path: str) -> mp4.SeekIndex:
        """Walk the top-level boxes with ranged reads (the moov may sit after the mdat) and index it."""
        size = obj.meta.size
        offset, ftyp, count = 0, None, 0
        while offset < size:
            count += 1
            if count > MAX_TOP_LEVEL_BOXES:
                raise mp4.MalformedMP4("too many top-level boxes")
            head = await self.filler.read(obj, path, offset, mp4.BOX_HEADER_READ)
            box = mp4.parse_box_header(head, offset, size)
            if box.type == b"ftyp":
                if box.size > 4096:
                    raise mp4.MalformedMP4(f"an ftyp box of {box.size} bytes")
                ftyp = await self.filler.read(obj, path, offset, box.size)
            elif box.type == b"moov":
                if box.size > self.max_moov:
                    raise MoovTooLarge(f"the moov box is {box.size} bytes, over the {self.max_moov}-byte cap")
                moov = await self.filler.read(obj, path, offset, box.size)
                if len(moov) < THREAD_MOOV_BYTES:
                    return mp4.SeekIndex.from_moov(moov, offset, size, ftyp)
                # a big moov takes tens of ms to index (~45 ms for a two-hour clip's 4.6 MB): in a thread,
                # the reactor gets the GIL back every few ms and other viewers keep being served
                reactor = self.filler.reactor
                index: mp4.SeekIndex = await deferToThreadPool(
                    reactor, reactor.getThreadPool(), mp4.SeekIndex.from_moov, moov, offset, size, ftyp)
                return index
            elif box.type in (b"moof", b"mfra", b"sidx"):
                raise mp4.UnsupportedMP4("fragmented MP4")
            offset += box.size
        raise mp4.MalformedMP4("no moov box")

    async def _flv_plan(self, obj: CachedObject, path: str, offset: int) -> Plan:
        meta = obj.meta
        cache_key = ("flv", meta.key, meta.size, meta.etag, meta.last_modified)
        index: Any = self.indexes.get(cache_key)
        if index is None:
            want = flv.FLV_HEAD_READ
            while True:
                head = await self.filler.read(obj, path, 0, want)
                try:
                    index = flv.parse_flv_head(head, meta.size)
                    break
                except flv.FLVHeadTooShort as e:
                    if e.needed <= want or e.needed > self.max_moov:
                        raise
                    want = e.needed
            self.indexes.put(cache_key, index)
        if offset >= meta.size:
            raise flv.BadFLVOffset(f"start={offset} is past the end of the file ({meta.size} bytes)")
        if offset < 4:
            raise flv.BadFLVOffset(f"start={offset} is not a tag boundary")
        # even offsets listed in onMetaData: that list is the file's word too, and a wrong entry would
        # send a viewer a stream that starts mid-tag; the 15 bytes are in the slice the answer needs
        around = await self.filler.read(obj, path, offset - 4, 15)
        flv.check_tag_at(index, offset, around)
        return flv.plan_for_flv_seek(index, meta.key, offset)

    def _purge(self, request: Request) -> bytes:
        """PURGE drops one object from the cache; only loopback clients may ask (put it behind your LB)."""
        peer = request.getClientAddress()
        if getattr(peer, "host", None) not in ("127.0.0.1", "::1"):
            return self._plain(request, 403, "PURGE is accepted from loopback clients only")
        raw_path, _, raw_query = request.uri.partition(b"?")
        try:
            target = parse_target(raw_path, raw_query, self.keep_query)
        except BadRequest as e:
            return self._plain(request, 400, str(e))
        removed = self.store.remove(target.key)
        return self._plain(request, 200 if removed else 404, ("purged " if removed else "not cached: ") + target.key)

    # -- other methods ------------------------------------------------------------------------

    async def _forward(self, request: Request, method: str) -> None:
        raw_path, _, raw_query = request.uri.partition(b"?")
        target = parse_target(raw_path, raw_query, self.keep_query)
        origin_path = target.path + ("?" + target.origin_query if target.origin_query else "")
        headers = {}
        for name in (b"Content-Type", b"Authorization", b"If-Match", b"If-Unmodified-Since"):
            value = request.getHeader(name)
            if value is not None:
                headers[name.decode()] = value.decode("latin-1")
        body = request.content.read() if request.content is not None else b""
        response = await self.origin.forward(method, origin_path, headers, body)
        try:
            content = await response.content()
        except Exception as e:
            raise OriginUnavailable(f"the origin's answer to {method} was cut short ({e.__class__.__name__})") from None
        if 200 <= response.code < 400:
            # RFC 9111 §4.4: a successful unsafe method invalidates the stored response
            self.store.remove(target.key)
        request.setResponseCode(response.code)
        for name in (b"Content-Type", b"Location", b"ETag", b"Last-Modified"):
            values = response.headers.getRawHeaders(name)
            if values:
                request.setHeader(name, values[-1])
        request.setHeader(b"Content-Length", str(len(content)).encode())
        request.setHeader(b"X-Cache", b"MISS")
        request.write(content)
        request.finish()


class SeekPlanCache:
    """
    Recently answered seeks (a shared link's ?start=, a chapter mark): their plans, so a repeated seek
    builds nothing.  Budgeted by the bytes of the plans' literal parts; keyed by the object's
    validators as well as start/end, so a changed clip never meets an old plan.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[tuple[Any, ...], tuple[Plan, int]] = OrderedDict()

    def get(self, key: tuple[Any, ...]) -> Optional[Plan]:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: tuple[Any, ...], plan: Plan) -> None:
        cost = sum(len(part.data) for part in plan.parts if isinstance(part, Literal)) + 200
        if cost > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= old[1]
        self._entries[key] = (plan, cost)
        self.size += cost
        while self.size > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.size -= evicted


def _h(request: Request, name: bytes) -> Optional[str]:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


def _derived_etag(obj: CachedObject, variant: str) -> Optional[str]:
    """
    The ETag of a rewritten answer: stable for one object version and one start/end.  Weak when the
    origin's ETag is weak: the origin promised equivalent content only, so we cannot promise bytes.
    """
    meta = obj.meta
    if meta.etag is None and meta.last_modified is None:
        return None
    basis = f"{meta.etag}|{meta.last_modified}|{meta.size}|{variant}".encode("utf-8", "replace")
    weak = "W/" if meta.etag is not None and meta.etag.startswith("W/") else ""
    return weak + '"' + hashlib.sha256(basis).hexdigest()[:24] + '"'
