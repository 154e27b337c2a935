# -*- test-case-name: tests.test_edge,tests.test_http_cache,tests.test_origin_lies -*-
"""
L{EdgeResource}: the edge as one twisted.web resource, embeddable in any Twisted app.

Each GET/HEAD becomes a L{Plan} (whole object, Range slice, MP4 or FLV seek, or a Range over a seek)
and goes out through one L{PlanProducer}, with the stored answer's status and header block (see
L{h264edge.httpcache}) and the edge's own framing, Age, Via and X-Cache.  Errors become one status
and a short plain body.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional
from urllib.parse import quote_from_bytes, unquote_to_bytes

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from h264edge import flv, mp4, tiers
from h264edge.errors import EdgeError, ObjectChanged, OriginStatus, OriginUnavailable
from h264edge.fill import BYPASS, HIT, MISS, STALE, Filler, FillFailed, Found, SharedResult, Want
from h264edge.httpcache import (
    CONTENT_DIGESTS,
    NOT_MODIFIED_FIELDS,
    REPRESENTATION_DIGESTS,
    Fields,
    RequestDirectives,
    derived_prefix,
    format_http_date,
    forwarded_request_fields,
    hop_by_hop,
    request_directives,
    values,
)
from h264edge.origin import OriginClient, OriginPath, field_list
from h264edge.plan import Literal, Plan
from h264edge.store import CachedObject, ObjectMeta, SliceStore, StoreError
from h264edge._twisted_compat import request_disconnected
from h264edge.web.http import (
    BadRequest,
    PurgeAuth,
    Target,
    Unsatisfiable,
    allowed_methods,
    excerpt,
    list_field,
    not_modified,
    parse_byte_offset,
    parse_key_prefix,
    parse_range,
    parse_seek,
    parse_target,
    range_applies,
    range_hint,
)
from h264edge.web.hot import HotAnswers
from h264edge.web.producer import PlanProducer, ThrottlePolicy

log = Logger()

MAX_TOP_LEVEL_BOXES = 4096
REWRITE_VERSION = 2
"""Part of every rewritten answer's ETag: bumped whenever the bytes of a seek answer change for the same
request (2: timed tracks kept, ends on frame boundaries), so that no client joins old and new bytes."""
THREAD_MOOV_BYTES = 512 * 1024  # moov boxes at least this big are indexed in a thread


class MoovTooLarge(mp4.UnsupportedMP4):
    """The clip's moov is over the --max-moov cap: seeking it would cost too much memory."""


class NotCached(EdgeError):
    """A request that may only be answered from the store (only-if-cached) and has nothing fresh there: 504."""


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
    if isinstance(error, NotCached):
        return 504, message
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
    @param name: how this edge names itself in Via and Cache-Status (see L{h264edge.tiers}); without
        one, answers and origin requests get no Via from it and loops are not checked.
    @param viewer_no_cache: honour viewers' request no-cache / max-age / min-fresh (off: as nginx and
        Varnish, a viewer cannot make the edge ask the origin).
    @param stale_if_error: seconds past its freshness a stored answer may stand in when the origins
        fail, unless the answer says otherwise (see L{Filler.stale_if_error}).
    @param store_set_cookie: store answers that set cookies, without their Set-Cookie.
    @param filler: the L{Filler} to use (C{twistd h264edge} shares one with its metrics and worker
        locks); without one, one is made from C{default_ttl}, C{stale_if_error} and
        C{store_set_cookie}, which are otherwise the given filler's own.
    @param hot_bytes: memory for L{HotAnswers} (the hot path of L{EdgeSite}); 0: none.
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
        name: Optional[str] = None,
        viewer_no_cache: bool = False,
        stale_if_error: float = 86400.0,
        store_set_cookie: bool = False,
    ) -> None:
        super().__init__()
        self.store = store
        self.origin = origin
        self.filler = filler or Filler(store, origin, reactor=reactor, default_ttl=default_ttl,
                                       stale_if_error=stale_if_error, store_set_cookie=store_set_cookie)
        self.viewer_no_cache = viewer_no_cache
        self.indexes = mp4.SeekIndexCache(seek_cache_bytes)
        self.seek_plans = SeekPlanCache(seek_cache_bytes // 4)
        self.max_moov = max_moov
        self.keep_query = keep_query
        self.pass_methods = tuple(m.upper() for m in pass_methods)
        self.exact_seek = exact_seek
        self._parsing: dict[tuple[Any, ...], SharedResult] = {}
        #: answers to plain GETs of small complete objects, for L{EdgeSite}'s hot path (None: off)
        self.hot = HotAnswers(store, hot_bytes, reactor) if hot_bytes > 0 else None
        if self.hot is not None:
            self.hot.viewer_cache_control = viewer_no_cache
        #: who may PURGE (a token, trusted proxies); shared with the admin listener
        self.purge_auth = PurgeAuth()
        #: which answers are paced, and how (None: none)
        self.throttle_policy: Optional[ThrottlePolicy] = None
        #: told (count, "viewer", target) after each PURGE (metrics)
        self.on_purge: Optional[Callable[[int, str, str], None]] = None
        #: this edge's name in Via and Cache-Status (see L{h264edge.tiers}); None: no Via, no loop check
        self.name = tiers.check_name(name) if name is not None else None
        #: what it adds to Via (on answers and origin requests), None without a name
        self.via: Optional[str] = tiers.via_onward(self.name, []) if self.name is not None else None
        if self.via is not None and self.filler.via is None:
            self.filler.via = self.via

    # -- dispatch -----------------------------------------------------------------------------

    def render(self, request: Request) -> Any:  # type: ignore[override]
        method = request.method.decode("ascii", "replace").upper()
        if self.name is not None and tiers.is_loop(self.name, _via(request)):
            return self._plain(request, 508, f"loop detected: this request already passed through {self.name}")
        if method in ("GET", "HEAD"):
            d = Deferred.fromCoroutine(self._serve(request))
        elif method in self.pass_methods:
            d = Deferred.fromCoroutine(self._forward(request, method))
        elif method == "PURGE":
            return self._purge(request)
        else:
            request.setHeader(b"Allow", allowed_methods(self.pass_methods).encode())
            return self._plain(request, 405, f"{excerpt(request.method)} is not allowed here")
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _plain(self, request: Request, code: int, message: str) -> bytes:
        body = (message + "\n").encode("utf-8", "replace")
        if code != 416:
            request.responseHeaders.removeHeader(b"Content-Range")
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if not request.responseHeaders.hasHeader(b"Cache-Status"):
            existing = request.responseHeaders.getRawHeaders(b"X-Cache")
            self._mark(request, existing[-1].decode("latin-1") if existing else MISS)
        return body

    def _failed(self, failure: Failure, request: Request) -> None:
        if request.finished or request_disconnected(request):
            return
        if request.startedWriting:
            log.failure("failed after the headers went out; dropping the connection", failure)
            if request.channel is not None and request.channel.transport is not None:
                request.channel.transport.abortConnection()
            return
        code, message = _status_for(failure)
        if code == 500:
            log.failure("internal error on {uri}", failure, uri=request.uri)
        _edge_answer_only(request, code)
        body = self._plain(request, code, message)
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    # -- GET / HEAD ---------------------------------------------------------------------------

    def _target(self, request: Request) -> Target:
        """What C{request} names below this resource's mount point (see L{path_below_mount})."""
        raw_path, _, raw_query = request.uri.partition(b"?")
        return parse_target(path_below_mount(request, raw_path), raw_query, self.keep_query)

    async def _serve(self, request: Request) -> None:
        target = self._target(request)
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
        fields = request_fields(request)
        asked = request_directives(fields)
        want = self._want(request, target, fields, asked, first, last)
        if asked.only_if_cached:
            _, stored = self.filler.lookup(want)
            if stored is None or not self.filler.fresh_enough(stored.meta, want, self.filler.reactor.seconds()):
                raise NotCached("only-if-cached, and no fresh answer is stored")
            found = Found(stored, HIT)
        else:
            found = await self.filler.find(want)
        obj = found.obj
        meta = obj.meta
        if meta.status != 200:
            self._relay(request, found, want.path)
            return
        # what an error answer about the object says from here on (a seek's 416, 501 or 502)
        request.setHeader(b"X-Cache", found.how.encode())

        etag, last_modified = meta.etag, meta.last_modified
        if seek is not None:
            index = await self._mp4_index(obj, want.path)
            # an end at or past the last track's end keeps every sample, exactly as no end does; passing
            # a huge one on overflows the media-time arithmetic (end=1e308 was a 502)
            end = seek[1] if seek[1] is not None and seek[1] < index.duration else None
            plan_key = (meta.key, meta.size, meta.etag, meta.last_modified, seek[0], end, self.exact_seek)
            plan = self.seek_plans.get(plan_key)
            if plan is None:
                plan = mp4.plan_for_seek(index, meta.key, seek[0], end, self.exact_seek)
                self.seek_plans.put(plan_key, plan)
            etag = _derived_etag(obj, f"mp4:{seek[0]!r}:{end!r}:{self.exact_seek}")
        elif flv_offset:
            plan = await self._flv_plan(obj, want.path, flv_offset)
            etag = _derived_etag(obj, f"flv:{flv_offset}")
        else:
            plan = Plan.whole(meta.key, meta.size)
        rewritten = seek is not None or bool(flv_offset)

        if not_modified(_h(request, b"If-None-Match"), _h(request, b"If-Modified-Since"), etag, last_modified):
            self._replay(request, meta, found.how, keep=NOT_MODIFIED_FIELDS)
            self._validators(request, etag, last_modified)
            self._mark(request, found.how, meta.headers)
            request.setResponseCode(304)
            request.finish()
            return

        content_type = "video/mp4" if seek is not None and meta.content_type == "application/octet-stream" \
            else meta.content_type
        total = plan.length
        byte_range = None
        if range_applies(_h(request, b"If-Range"), etag, last_modified):
            try:
                byte_range = parse_range(_h(request, b"Range"), total)
            except Unsatisfiable:
                request.setHeader(b"Content-Range", f"bytes */{total}".encode())
                self._mark(request, found.how, meta.headers)
                raise
        drop = CONTENT_DIGESTS | (REPRESENTATION_DIGESTS if rewritten else frozenset())
        self._replay(request, meta, found.how, drop=drop if rewritten or byte_range is not None else frozenset())
        self._validators(request, etag, last_modified)
        request.setHeader(b"Accept-Ranges", b"bytes")
        request.setHeader(b"Content-Type", content_type.encode("latin-1"))
        if byte_range is not None:
            plan = plan.slice(*byte_range)
            request.setResponseCode(206)
            request.setHeader(b"Content-Range", f"bytes {byte_range[0]}-{byte_range[1]}/{total}".encode())
        cache_status = self._cache_status(obj, plan, found.how)
        self._mark(request, cache_status, meta.headers)
        request.setHeader(b"Content-Length", str(plan.length).encode())
        if request.method == b"HEAD" or plan.length == 0:
            request.finish()
            return
        if self.hot is not None and cache_status == HIT and byte_range is None and not rewritten \
                and request.method == b"GET" and not meta.vary:
            self.hot.record(request.uri, obj, request)
        self._stream(request, plan, obj, want.path)

    def _want(self, request: Request, target: Any, fields: Fields, asked: RequestDirectives, first: int,
              last: Optional[int]) -> Want:
        """What the cache needs to know of C{request}, with the fields forwarded to the origin for it."""
        forwarded = forwarded_request_fields(fields, _client(request), self.via)
        origin_path = OriginPath(target.path + ("?" + target.origin_query if target.origin_query else ""), forwarded)
        honour = self.viewer_no_cache
        return Want(
            key=target.key,
            path=origin_path,
            fields=fields,
            first=first,
            last=last,
            authorized=bool(values(fields, "Authorization")),
            no_store=asked.no_store,
            revalidate=honour and asked.no_cache,
            max_age=asked.max_age if honour else None,
            min_fresh=asked.min_fresh if honour else 0.0,
        )

    def _stream(self, request: Request, plan: Plan, obj: CachedObject, path: str) -> None:
        producer = PlanProducer(request, plan, {obj.meta.key: obj}, {obj.meta.key: path}, self.filler,
                                on_early_failure=lambda failure: self._failed(failure, request))
        request.notifyFinish().addErrback(lambda _: producer.stopProducing())
        producer.throttle_policy = self.throttle_policy
        producer.start()

    def _relay(self, request: Request, found: Found, path: str) -> None:
        """
        An answer with another status than 200 (a 301 with its Location, a 404 page): its status,
        header block and body as the origin sent them.  Range and conditionals do not apply to it
        (RFC 9110 §13.2.1, §14.2).
        """
        obj, meta = found.obj, found.obj.meta
        request.setResponseCode(meta.status)
        self._replay(request, meta, found.how)
        self._validators(request, meta.etag, meta.last_modified)
        if meta.content_type:
            request.setHeader(b"Content-Type", meta.content_type.encode("latin-1"))
        else:
            _no_default_content_type(request)
        self._mark(request, self._cache_status(obj, Plan.whole(meta.key, meta.size), found.how), meta.headers)
        if meta.status in (204, 304) or meta.status < 200:
            request.finish()
            return
        request.setHeader(b"Content-Length", str(meta.size).encode())
        if request.method == b"HEAD" or meta.size == 0:
            request.finish()
            return
        self._stream(request, Plan.whole(meta.key, meta.size), obj, path)

    def _replay(self, request: Request, meta: ObjectMeta, how: str, *, drop: frozenset[str] = frozenset(),
                keep: Optional[frozenset[str]] = None) -> None:
        """
        Put the stored header block on C{request}'s answer (less the fields in C{drop}, or only those
        in C{keep}), with the stored Date, this edge added to Via (RFC 9110 §7.6.3) and an Age: on
        every answer from the store, and on a fresh one when the origin's already had one (RFC 9111
        §5.1, §4.2.3).
        """
        headers = request.responseHeaders
        fields = [(name, value) for name, value in meta.headers
                  if name.lower() not in drop and (keep is None or name.lower() in keep)]
        for name in {name for name, _ in fields}:
            headers.removeHeader(name)
        for name, value in fields:
            headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        if not values(meta.headers, "Date"):
            headers.setRawHeaders(b"Date", [format_http_date(meta.fetched_at).encode("ascii")])
        if self.via is not None:
            headers.setRawHeaders(b"Via", [", ".join(values(meta.headers, "Via") + [self.via]).encode("latin-1")])
        age = int(meta.current_age(self.filler.reactor.seconds()))
        if how in (HIT, STALE) or age > 0:
            headers.setRawHeaders(b"Age", [str(age).encode("ascii")])

    @staticmethod
    def _validators(request: Request, etag: Optional[str], last_modified: Optional[str]) -> None:
        if etag:
            request.setHeader(b"ETag", etag.encode("latin-1"))
        if last_modified:
            request.setHeader(b"Last-Modified", last_modified.encode("latin-1"))

    def _mark(self, request: Request, x_cache: str, block: Optional[Fields] = None) -> None:
        """
        Say how the answer was found: C{X-Cache} (see L{h264edge.fill}), the RFC 9211 C{Cache-Status}
        chain (the members of caches nearer the origin, from the relayed C{block}'s own field, then
        ours) and, for an answer of the edge's own (no C{block}) with a name, C{Via} (a relayed
        answer's Via is the block's, with ours added where the block is put on the answer).

        @param block: the header block the answer relays: a stored answer's, or a pass-through answer's.
        """
        request.setHeader(b"X-Cache", x_cache.encode())
        upstream = ", ".join(values(block, "Cache-Status")) if block is not None else None
        request.setHeader(b"Cache-Status", tiers.cache_status(self.name or "h264edge", x_cache, upstream)
                          .encode("latin-1"))
        if block is None and self.via is not None:
            request.setHeader(b"Via", self.via.encode("latin-1"))

    def _cache_status(self, obj: CachedObject, plan: Plan, how: str) -> str:
        """The X-Cache value: C{how} the answer was had, a stored one told apart as HIT, PARTIAL or MISS."""
        if how != HIT:
            return how
        spans = list(plan.spans())
        ready = [self.filler.readable(obj, span.offset) >= span.length for span in spans]
        if all(ready):
            return HIT
        return "PARTIAL" if any(obj.available_from(s.offset) for s in spans) or any(ready) else MISS

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
        # send a viewer a stream that starts mid-tag; these bytes are in the slice the answer needs
        around = await self.filler.read(obj, path, offset - 4, flv.CHECK_TAG_READ)
        flv.check_tag_at(index, offset, around)
        return flv.plan_for_flv_seek(index, meta.key, offset)

    def _purge(self, request: Request) -> bytes:
        """
        PURGE drops a path's objects from the cache (see L{purge}); only loopback clients may ask,
        with the token when one is set (L{PurgeAuth}).
        """
        refusal = purge_refusal(self.purge_auth, request, viewer_listener=True)
        if refusal is not None:
            return self._plain(request, *refusal)
        try:
            target = self._target(request)
        except BadRequest as e:
            return self._plain(request, 400, str(e))
        removed = self.purge_target(target)
        request.setHeader(b"X-Cache", BYPASS.encode())
        shown = target.key if len(target.key) <= 200 else target.key[:200] + "..."  # percent-encoded ASCII
        if self.on_purge is not None:
            self.on_purge(removed, "viewer", shown)
        if not removed:
            return self._plain(request, 404, "not cached: " + shown)
        return self._plain(request, 200, f"purged {shown}" + (f" and {removed - 1} variants" if removed > 1 else ""))

    def clip_bitrate(self, obj: CachedObject, path: str) -> "Deferred[Optional[float]]":
        """An MP4's bytes per second of media (its size over its duration); None if it cannot be read."""

        async def bitrate() -> Optional[float]:
            try:
                index = await self._mp4_index(obj, path)
            except EdgeError:
                return None
            return obj.meta.size / index.duration if index.duration > 0 else None

        return Deferred.fromCoroutine(bitrate())

    def purge(self, target: str) -> int:
        """
        Drop the cached objects of a request target (below this resource's mount point, as its keys
        are); how many went.  C{/clip.mp4} drops that path's
        object and those of the path with any query string; with a query (less C{start}/C{end}),
        only that key; either way with every Vary variant kept under the key.  Seek answers, Range
        answers and hot answers are made from those objects, so they go with them.  The target is
        text, percent-encoded or not (C{/€.mp4} and C{/%E2%82%AC.mp4} name one object): its
        characters are taken as UTF-8, as a request's path is.

        @raise BadRequest: the target is not a path the edge would serve.
        """
        raw_path, _, raw_query = target.encode("utf-8").partition(b"?")
        return self.purge_target(parse_target(raw_path, raw_query, self.keep_query))

    def purge_target(self, target: Target) -> int:
        """L{purge} for a parsed target."""
        removed = int(self.store.remove(target.key))
        variants = derived_prefix(target.key)  # a Vary'd answer's variants
        removed += self.store.remove_matching(lambda key: key.startswith(variants))
        if target.key == target.path:
            removed += self.store.remove_matching(lambda key: key.startswith(target.path + "?"))
        return removed

    def purge_prefix(self, prefix: str) -> int:
        """
        Drop every cached object whose key starts with C{prefix} (a path prefix: C{/videos/2024/},
        percent-encoded or not, see L{parse_key_prefix}).

        @raise BadRequest: the prefix does not start with C{/}, or is not UTF-8.
        """
        start = parse_key_prefix(prefix)
        return self.store.remove_matching(lambda key: key.startswith(start))

    # -- other methods ------------------------------------------------------------------------

    async def _forward(self, request: Request, method: str) -> None:
        """
        A pass-through method: the viewer's end-to-end fields and body go to the origin once (see
        L{OriginClient.forward}), its answer comes back as it is, and nothing is stored; a
        successful answer invalidates the stored one (RFC 9111 §4.4).
        """
        target = self._target(request)
        origin_path = target.path + ("?" + target.origin_query if target.origin_query else "")
        fields = request_fields(request)
        forwarded = [(name, value) for name, value in forwarded_request_fields(fields, _client(request), self.via)]
        for name in ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range", "Range"):
            forwarded += [(name, value) for value in values(fields, name)]
        body = request.content.read() if request.content is not None else b""
        response = await self.origin.forward(method, origin_path, forwarded, body)
        try:
            content = await response.content()
        except Exception as e:
            raise OriginUnavailable(f"the origin's answer to {method} was cut short ({e.__class__.__name__})") from None
        if 200 <= response.code < 400:
            # RFC 9111 §4.4: a successful unsafe method invalidates the stored response
            self.store.remove(target.key)
        request.setResponseCode(response.code)
        answer = field_list(response.headers)
        skipped = hop_by_hop(answer) | {"content-length", "x-cache"}
        kept = [(name, value) for name, value in answer if name.lower() not in skipped]
        for name in {name for name, _ in kept}:
            request.responseHeaders.removeHeader(name)
        for name, value in kept:
            request.responseHeaders.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        if not values(kept, "Content-Type"):
            _no_default_content_type(request)
        vias = values(kept, "Via") + ([self.via] if self.via is not None else [])
        if vias:
            request.responseHeaders.setRawHeaders(b"Via", [", ".join(vias).encode("latin-1")])
        request.setHeader(b"Content-Length", str(len(content)).encode())
        self._mark(request, BYPASS, tuple(kept))
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


def purge_refusal(auth: PurgeAuth, request: Request, viewer_listener: bool) -> Optional[tuple[int, str]]:
    """C{auth}'s answer to the purge C{request} (L{PurgeAuth.refusal}); a 401 gets its WWW-Authenticate."""
    peer = request.getClientAddress()
    refusal = auth.refusal(str(getattr(peer, "host", "")),
                           list_field(request.requestHeaders.getRawHeaders(b"X-Forwarded-For")),
                           _h(request, b"Authorization"), viewer_listener)
    if refusal is not None and refusal[0] == 401:
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="h264edge"')
    return refusal


def request_fields(request: Request) -> Fields:
    """A request's header fields as text (latin-1)."""
    return field_list(request.requestHeaders)


def _client(request: Request) -> Optional[str]:
    peer = request.getClientAddress()
    return peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else None


#: headers an error answer of the edge's own keeps of what was set for the answer it replaces
_KEPT_ON_ERROR = frozenset({b"server", b"x-served-by", b"x-cache", b"cache-status", b"via", b"allow"})


def _edge_answer_only(request: Request, code: int) -> None:
    """Drop what was set for an answer that became an error answer (a replayed Cache-Control above all)."""
    headers = request.responseHeaders
    for name, _ in list(headers.getAllRawHeaders()):
        lower = name.lower()
        if lower not in _KEPT_ON_ERROR and not (code == 416 and lower == b"content-range"):
            headers.removeHeader(name)
    headers.setRawHeaders(b"Date", [datetimeToString()])
    request.defaultContentType = b"text/html"


def path_below_mount(request: Request, raw_path: bytes) -> bytes:
    """
    The part of C{raw_path} (as sent, still percent-encoded) below the resource that renders
    C{request}: C{/clip.mp4} for C{/video/clip.mp4} when the resource is the child C{video} of the
    root.  Site consumed one segment into C{request.prepath} per level above it; when those are not
    the path's first segments (a wrapper rewrote them), the path is rebuilt from C{request.postpath}.
    """
    prepath = request.prepath or []
    if not prepath or not raw_path.startswith(b"/"):
        return raw_path
    segments = raw_path.split(b"/")[1:]
    if [unquote_to_bytes(segment) for segment in segments[: len(prepath)]] == prepath:
        return b"/" + b"/".join(segments[len(prepath):])
    return ("/" + "/".join(quote_from_bytes(segment, safe=b"") for segment in request.postpath or [])).encode("ascii")


def _via(request: Request) -> list[str]:
    return [v.decode("latin-1") for v in request.requestHeaders.getRawHeaders(b"Via") or []]


def _no_default_content_type(request: Any) -> None:
    """An answer without a Content-Type gets none: not twisted.web's default (text/html)."""
    request.defaultContentType = None


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
    basis = f"{meta.etag}|{meta.last_modified}|{meta.size}|{variant}|{REWRITE_VERSION}".encode("utf-8", "replace")
    weak = "W/" if meta.etag is not None and meta.etag.startswith("W/") else ""
    return weak + '"' + hashlib.sha256(basis).hexdigest()[:24] + '"'
