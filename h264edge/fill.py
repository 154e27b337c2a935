# -*- test-case-name: tests.test_edge,tests.test_http_cache,tests.test_origin_lies,tests.test_shared_fill -*-
"""
The cache's decisions and single-flight fills: which stored answer a request gets (L{Filler.find}:
fresh, stale while revalidating or while origins fail, revalidated, or fetched, following the rules
of L{h264edge.httpcache}), and origin bodies written through into the store, readers woken as bytes
land.

Every slice of an object is, at any moment, present (on disk, committed), in flight (owned by exactly
one L{_Fetch}, with a count of bytes written from the slice start) or missing.  A reader asks
L{Filler.readable} how many bytes it may read at an offset, and L{Filler.wait}s when the answer is 0;
L{Filler.ensure} starts fetches only for slices that are missing and not in flight, so N viewers of
one cold object cause one origin request per slice.  A body that ends early resumes with a Range
request from the first byte not written; bytes are never marked present before they are written, and
an object whose validators change under a fill is dropped.

An object held in memory (transient, or uncached by a full disk: L{CachedObject.in_memory}) has room
for a few slices only: before a fetch writes a slice it asks for room, ranking slices by how soon a
reader will read them (readers say what they still want: L{hold} and L{read}); with none to spare it
pauses its origin socket and goes on when a reader moves on (L{moved}) or leaves.  So a slow viewer
of such an object slows the origin down instead of filling memory.

With C{shared} (several processes on one cache directory), fills are coordinated across processes
through L{FillLocks}: a key not cached yet is asked of the origin by one process, which publishes
the new object's sidecar at once; a slice is fetched by the process holding its lock, and the others
read it as that process writes it (its write counts) and take it as present once it is whole.
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Iterable, Optional, Protocol

import attrs
from attrs import define, field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from h264edge.errors import EdgeError, ObjectChanged, OriginStatus, OriginUnavailable
from h264edge.httpcache import (
    Fields,
    bypass_key,
    HeaderError,
    format_http_date,
    initial_age,
    last_value,
    parse_vary,
    response_policy,
    secondary_key,
    stored_fields,
    updated_fields,
    values,
    variant_key,
    weak_match,
)
from h264edge.observer import NULL_OBSERVER, EdgeObserver
from h264edge.origin import OriginClient, OriginReply, read_body
from h264edge.store import CachedObject, ObjectMeta, SliceStore, StoreError
from h264edge.store._fill_locks import HELD, TAKEN, FillLocks, SliceLocks

log = Logger()

# How an answer came to be, as the X-Cache header says it (the web layer tells HIT from PARTIAL).
HIT = "HIT"  # a stored answer, fresh
MISS = "MISS"  # fetched from the origin and stored (or being stored)
STALE = "STALE"  # a stored answer past its freshness: stale-while-revalidate, or standing in for a failing origin
REVALIDATED = "REVALIDATED"  # a stored answer the origin just confirmed (304)
BYPASS = "BYPASS"  # fetched from the origin for this request only: the answer or the request forbids storing it

MAX_BUFFERED_BODY = 1 << 20
"""An answer without a length (chunked, not a 206) is read whole up to this size, else it is a 502."""
MAX_OBJECT_SLICES = 1 << 24
"""An origin's answer of more slices than this is refused (502): every object, stored or streamed through,
keeps a bit per slice (twice), and a Content-Length of 18 digits would otherwise claim gigabytes of them."""
MAX_SECONDARY_KEY = 4096
"""A variant whose selecting request fields come to more than this is not stored (a huge Cookie or
custom field would otherwise make a key, and an index entry, of that size for every value)."""


class FillFailed(EdgeError):
    """The bytes a reader waits for will not arrive (origin gone, object changed, disk full)."""


class SharedResult:
    """
    One outcome handed to any number of waiters, each with its own Deferred.  It consumes the
    outcome of the Deferred it is given: add callbacks that need the result before wrapping it.
    """

    def __init__(self, d: "Deferred[Any]") -> None:
        self._waiting: list[Deferred[Any]] = []
        self._result: Any = None
        self._done = False
        d.addBoth(self._fire)

    def _fire(self, result: Any) -> None:
        self._done, self._result = True, result
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            self._deliver(w)

    def _deliver(self, w: "Deferred[Any]") -> None:
        if isinstance(self._result, Failure):
            w.errback(self._result)
        else:
            w.callback(self._result)

    def result(self) -> "Deferred[Any]":
        w: Deferred[Any] = Deferred()
        if self._done:
            self._deliver(w)
        else:
            self._waiting.append(w)
        return w


class Reader(Protocol):
    """Who reads an object held in memory: what it has still to read of it, in reading order."""

    def wanted(self, obj: CachedObject) -> Iterable[tuple[int, int]]:
        """C{(offset, length)} spans of C{obj} still to be read, soonest first."""


@frozen
class Want:
    """
    One viewer's request as the cache sees it.

    @ivar key: the primary cache key (path and kept query); a Vary'd answer is stored under a key
        of its own made from this one (L{h264edge.httpcache.variant_key}).
    @ivar path: the origin path, an L{h264edge.origin.OriginPath} carrying the fields forwarded.
    @ivar fields: the viewer's request fields (they select among variants).
    @ivar first: the first byte wanted first (negative: the last C{-first} bytes), C{last} the last.
    @ivar authorized: the request carries Authorization (RFC 9111 §3.5).
    @ivar no_store: the request said no-store.
    @ivar revalidate: ask the origin even if a fresh answer is stored (a viewer's no-cache, when the
        edge honours it); C{max_age} and C{min_fresh} likewise narrow what is fresh enough.
    """

    key: str
    path: str
    fields: Fields = ()
    first: int = 0
    last: Optional[int] = None
    authorized: bool = False
    no_store: bool = False
    revalidate: bool = False
    max_age: Optional[float] = None
    min_fresh: float = 0.0

    @property
    def private(self) -> bool:
        """Its answer may be for it alone: it never shares an origin contact with other requests."""
        return self.authorized or self.no_store


@frozen
class Found:
    """The object a request is answered from, and how it was had (L{HIT}, L{MISS}, ...)."""

    obj: CachedObject
    how: str


@define(eq=False)
class _ObjectState:
    obj: CachedObject
    path: str
    inflight: dict[int, "_Fetch"] = field(factory=dict)
    progress: dict[int, int] = field(factory=dict)  # slice -> bytes written from the slice start
    waiters: list[tuple[int, "Deferred[None]"]] = field(factory=list)
    failure: Optional[Failure] = None
    blocked: list["_Fetch"] = field(factory=list)  # fetches paused for want of room (in memory)
    locks: Optional[SliceLocks] = None  # with shared fills: this object's slice locks
    remote: set[int] = field(factory=set)  # slices another process is fetching
    poller: Any = None  # the delayed call that next looks at the remote slices


class Filler:
    """Finds the stored answer for a request, or fetches it from the origin once, into the store."""

    observer: EdgeObserver = NULL_OBSERVER

    def __init__(
        self,
        store: SliceStore,
        origin: OriginClient,
        reactor: Any = None,
        default_ttl: float = 3600.0,
        idle_timeout: float = 30.0,
        max_resumes: int = 5,
        stale_if_error: float = 86400.0,
        store_set_cookie: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.store = store
        self.origin = origin
        self.reactor: Any = reactor
        self.default_ttl = default_ttl
        self.idle_timeout = idle_timeout
        self.max_resumes = max_resumes
        #: seconds past its freshness a stored answer may stand in for failing origins, unless it says
        #: otherwise (stale-if-error) or forbids it (must-revalidate, ...)
        self.stale_if_error = stale_if_error
        #: store answers with Set-Cookie (without it) instead of passing them through
        self.store_set_cookie = store_set_cookie
        self._states: dict[int, _ObjectState] = {}
        self._contacts: dict[str, SharedResult] = {}
        # keys whose origins all failed while a stale copy stood in: serve it without asking again until then
        self._down_until: dict[str, float] = {}
        self.stale_retry = 10.0
        self._viewers: dict[int, int] = {}  # id(object) -> viewers streaming from it
        self._readers: dict[int, list[Reader]] = {}  # id(object) -> its readers that said what they want
        self.steal_distance = 4  # slices
        self.origin_bytes = 0  # statistics: body bytes received from origins
        #: fills coordinated with other processes on the store's directory (None: this process alone)
        self.shared: Optional[FillLocks] = None
        self.poll_interval = 0.01  # seconds between looks at slices another process fetches
        #: the Via origin requests carry when they forward no viewer's (C{1.1 NAME} of this edge), or None
        self.via: Optional[str] = None

    # -- finding the answer ---------------------------------------------------------------------

    def lookup(self, want: Want) -> tuple[Optional[CachedObject], Optional[CachedObject]]:
        """
        C{(marker, answer)} stored for C{want}: the answer at its key, or, when a Vary marker stands
        there, the marker and the variant the request's fields select (None if not stored).
        """
        found = self.store.get(want.key)
        if found is None or not found.meta.variants:
            return None, found
        variant = self._variant_of(want, found)
        assert variant is not None
        return found, self.store.get(variant)

    def fresh_enough(self, meta: ObjectMeta, want: Want, now: float) -> bool:
        """Whether a stored answer may answer C{want} without asking the origin (RFC 9111 §4.2)."""
        if want.revalidate or not meta.is_fresh(now + want.min_fresh):
            return False
        return want.max_age is None or meta.current_age(now) <= want.max_age

    def may_stand_in(self, meta: ObjectMeta, now: float) -> bool:
        """Whether a stale answer may be served for failing origins (RFC 9111 §4.2.4, RFC 5861 §4)."""
        window = meta.stale_if_error if meta.stale_if_error is not None else self.stale_if_error
        return not meta.revalidate and now <= meta.expires_at + window

    async def find(self, want: Want) -> Found:
        """
        The answer for C{want}: a stored one that is fresh enough (L{HIT}); a stale one while it is
        revalidated in the background or while the origins fail (L{STALE}); or the origin's, from
        a contact that concurrent requests for the same stored answer share (L{MISS},
        L{REVALIDATED}, L{BYPASS}).  A shared answer that may not be stored (another viewer's
        private answer) or that is another variant is never handed on: such a request asks the
        origin again for itself.
        """
        for _ in range(3):
            marker, obj = self.lookup(want)
            now = self.reactor.seconds()
            if obj is not None:
                meta = obj.meta
                if self.fresh_enough(meta, want, now):
                    return Found(obj, HIT)
                if self._down_until.get(meta.key, 0.0) > now and self.may_stand_in(meta, now):
                    return Found(obj, STALE)
                if not want.revalidate and not meta.revalidate and now < meta.expires_at + meta.stale_while_revalidate:
                    self._revalidate_later(want, obj, marker)
                    return Found(obj, STALE)
            if want.private:
                return await self._contact(want, obj, marker)
            contact = obj.meta.key if obj is not None else self._variant_of(want, marker) or want.key
            shared = self._contacts.get(contact)
            if shared is None:
                return await self._shared_contact(contact, want, obj, marker).result()
            found: Found = await shared.result()
            if found.obj.transient:
                return await self._contact(want, obj, marker)
            if not found.obj.meta.vary or found.obj.meta.key == self._variant_of(want, self.store.get(want.key)):
                return found
        return await self._contact(want, None, None)

    @staticmethod
    def _variant_of(want: Want, marker: Optional[CachedObject]) -> Optional[str]:
        """The key C{want}'s variant has under C{marker} (None without a marker)."""
        if marker is None or not marker.meta.variants:
            return None
        return variant_key(want.key, marker.meta.variants, secondary_key(marker.meta.vary, want.fields))

    def _shared_contact(
        self, contact: str, want: Want, stale: Optional[CachedObject], marker: Optional[CachedObject]
    ) -> SharedResult:
        d = Deferred.fromCoroutine(self._contact(want, stale, marker))
        shared = self._contacts[contact] = SharedResult(d)
        d.addBoth(self._contact_done, contact)
        return shared

    def _contact_done(self, result: Any, key: str) -> None:
        self._contacts.pop(key, None)

    def _revalidate_later(self, want: Want, stale: CachedObject, marker: Optional[CachedObject]) -> None:
        """stale-while-revalidate (RFC 5861 §3): one revalidation in the background, for the first slice."""
        contact = stale.meta.key
        if contact in self._contacts:
            return
        log.info("revalidating {key} in the background", key=contact)
        background = attrs.evolve(want, first=0, last=self.store.slice_size - 1)
        d = Deferred.fromCoroutine(self._contact(background, stale, marker))

        def failed(failure: Failure) -> Failure:
            log.warn("background revalidation of {key} failed: {why}", key=contact, why=failure.getErrorMessage())
            return failure

        d.addErrback(failed)
        self._contacts[contact] = SharedResult(d)
        d.addBoth(self._contact_done, contact)

    def _standing_in(self, stale: CachedObject, why: str) -> Found:
        key = stale.meta.key
        log.warn("serving stale {key}: {why}", key=key, why=why)
        now = self.reactor.seconds()
        if len(self._down_until) > 10_000:  # keep it bounded through a long outage
            self._down_until = {k: t for k, t in self._down_until.items() if t > now}
        self._down_until[key] = now + self.stale_retry
        return Found(stale, STALE)

    async def _contact(self, want: Want, stale: Optional[CachedObject], marker: Optional[CachedObject]) -> Found:
        """
        Ask the origin for C{want}.  With shared fills, an answer not stored yet is asked for by one
        process (its contact lock); the others wait for its object's sidecar and take it from there.
        """
        if stale is not None or self.shared is None or want.private:
            return await self._ask_origin(want, stale, marker)
        key = self._variant_of(want, marker) or want.key
        lock = self.shared.contact(key)
        deadline = self.reactor.seconds() + 3 * self.origin.timeout
        while lock is None and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, self.poll_interval, lambda: None)
            marker, found = self.lookup(want)
            if found is not None:
                if self.fresh_enough(found.meta, want, self.reactor.seconds()):
                    return Found(found, HIT)
                return await self._ask_origin(want, found, marker)
            lock = self.shared.contact(key)
        try:
            marker, found = self.lookup(want)  # published between our look and our lock
            if found is not None and self.fresh_enough(found.meta, want, self.reactor.seconds()):
                return Found(found, HIT)
            result = await self._ask_origin(want, found, marker)
            if result.obj is not found:
                published = self.store.publish(result.obj)
                if lock is not None:
                    # the others wait for its sidecar (put in place in a thread): the lock goes once
                    # it is there, while this viewer's answer goes on at once
                    held, lock = lock, None
                    published.addBoth(lambda _: held.release())
            return result
        finally:
            if lock is not None:
                lock.release()

    async def _ask_origin(
        self, want: Want, stale: Optional[CachedObject], marker: Optional[CachedObject]
    ) -> Found:
        ss = self.store.slice_size
        if want.first < 0:
            # a suffix range: one slice more than asked, so that the answer holds every slice of the
            # tail whole (the first one it touches may start before the asked bytes)
            rfirst, rlast = want.first - ss, None
        else:
            rfirst = (want.first // ss) * ss
            rlast = None if want.last is None else (want.last // ss + 1) * ss - 1
        conditional: dict[str, str] = {}
        if stale is not None:
            if stale.meta.etag:
                conditional["If-None-Match"] = stale.meta.etag
            if stale.meta.last_modified:
                conditional["If-Modified-Since"] = stale.meta.last_modified
        try:
            reply = await self.origin.fetch(want.path, rfirst, rlast, conditional or None, via=self.via)
            if reply.code == 416 and rfirst != 0 and reply.total != 0:
                # the wanted range starts past the end: learn the object from its first slice instead
                reply = await self.origin.fetch(want.path, 0, ss - 1, conditional or None, via=self.via)
        except OriginUnavailable as e:
            if stale is not None and self.may_stand_in(stale.meta, self.reactor.seconds()):
                return self._standing_in(stale, "no origin answered")
            if stale is not None and stale.meta.revalidate:
                # RFC 9111 §5.2.2.2: a stored answer that must be revalidated and cannot be: 504
                raise OriginUnavailable(f"{e} (the stored answer must be revalidated)", timeout=True) from None
            raise
        try:
            return await self._adopt(want, reply, stale, marker)
        except BaseException:
            reply.discard()
            raise

    async def _adopt(
        self, want: Want, reply: OriginReply, stale: Optional[CachedObject], marker: Optional[CachedObject]
    ) -> Found:
        """Turn the origin's answer into the object that answers C{want}, stored or not, and start its fill."""
        now = reply.response_time or self.reactor.seconds()
        code = reply.code
        if code >= 500 and stale is not None and self.may_stand_in(stale.meta, now):
            reply.discard()
            return self._standing_in(stale, f"the origin answered {code}")
        if code == 304:
            if stale is None:
                raise OriginUnavailable(f"{reply.url}: 304 to a request without conditionals")
            try:
                return self._revalidated(want, reply, stale, marker, now)
            except OriginUnavailable as e:  # a 304 that cannot be used (another entity-tag, a huge block)
                if self.may_stand_in(stale.meta, now):
                    return self._standing_in(stale, str(e))
                raise
        empty = code == 416 and reply.total == 0
        if code == 416 and not empty:
            raise OriginUnavailable(f"{reply.url}: 416 for the object's first bytes")
        status = 200 if code in (200, 206) or empty else code
        fields = reply.fields
        policy = response_policy(status, fields, response_time=now, default_ttl=self.default_ttl,
                                 authorized=want.authorized, request_no_store=want.no_store,
                                 store_set_cookie=self.store_set_cookie)
        try:
            block = stored_fields(fields, strip=policy.strip, date=format_http_date(now))
        except HeaderError as e:
            raise OriginUnavailable(f"{reply.url}: {e}") from None
        body: Optional[bytes] = None
        total = 0 if empty else reply.total
        if total is None:
            body = await read_body(reply, MAX_BUFFERED_BODY)
            total = len(body)
        if total > MAX_OBJECT_SLICES * self.store.slice_size:
            raise OriginUnavailable(f"{reply.url}: an object of {total} bytes is too large (over "
                                    f"{MAX_OBJECT_SLICES} slices of {self.store.slice_size} bytes)")
        age = initial_age(fields, reply.request_time, now)
        vary = parse_vary(values(fields, "Vary")) or ()
        key = want.key
        secondary = secondary_key(vary, want.fields) if vary else ""
        store = policy.store and len(secondary) <= MAX_SECONDARY_KEY
        if not store:
            key = bypass_key(want.key, secrets.token_hex(8))
        elif vary:
            marker = self._marker(want.key, vary, marker, now)
            key = variant_key(want.key, marker.meta.variants, secondary)
        content_type = last_value(fields, "Content-Type")
        meta = ObjectMeta(
            key=key,
            size=total,
            etag=last_value(fields, "ETag"),
            last_modified=last_value(fields, "Last-Modified"),
            content_type=content_type if content_type is not None else
            ("application/octet-stream" if status == 200 else ""),
            fetched_at=now,
            expires_at=now + policy.lifetime - age,
            status=status,
            headers=block,
            age=age,
            stale_while_revalidate=policy.stale_while_revalidate,
            stale_if_error=policy.stale_if_error,
            revalidate=policy.revalidate,
            vary=vary,
        )
        self._down_until.pop(want.key, None)
        self._down_until.pop(key, None)
        reusable = (
            stale is not None
            and store
            and stale.meta.key == key
            and not stale.evicted
            and (meta.etag is not None or meta.last_modified is not None)  # size alone proves nothing
            and stale.meta.same_representation(meta)
        )
        if reusable:
            assert stale is not None
            self.store.refresh(stale, meta)
            obj = stale
        else:
            obj = self.store.create(meta, transient=not store)
        how = MISS if store else BYPASS
        if body is not None:
            self._write_whole(obj, body)
        elif meta.size == 0:
            reply.discard()
        else:
            self._start(self._state(obj, want.path), reply, want.path)
        return Found(obj, how)

    def _revalidated(
        self, want: Want, reply: OriginReply, stale: CachedObject, marker: Optional[CachedObject], now: float
    ) -> Found:
        """
        A 304: the stored answer is still good; its header block and freshness are updated (RFC 9111
        §4.3.4).  A 304 to a private request (Authorization, no-store) validates the stored answer for
        that request only: the store is left as it was.
        """
        fresh = reply.fields
        reply.discard()
        etag = last_value(fresh, "ETag")
        if etag is not None and stale.meta.etag is not None and not weak_match(etag, stale.meta.etag):
            raise OriginUnavailable(f"{reply.url}: 304 for another entity-tag ({etag[:40]}) than the stored one")
        if want.private:
            return Found(stale, REVALIDATED)
        old = stale.meta
        try:
            # a stored answer goes without Set-Cookie (see response_policy): one a 304 brings is this
            # viewer's, never merged into what every later viewer gets
            block = updated_fields(old.headers, fresh,
                                   strip=frozenset({"set-cookie"}) if self.store_set_cookie else frozenset())
        except HeaderError as e:
            raise OriginUnavailable(f"{reply.url}: {e}") from None
        validators = tuple((name, value) for name, value in (("Last-Modified", old.last_modified),) if value)
        policy = response_policy(old.status, block + validators, response_time=now, default_ttl=self.default_ttl,
                                 store_set_cookie=self.store_set_cookie)
        age = initial_age(fresh, reply.request_time, now)
        meta = attrs.evolve(
            old,
            headers=block,
            fetched_at=now,
            expires_at=now + policy.lifetime - age,
            age=age,
            stale_while_revalidate=policy.stale_while_revalidate,
            stale_if_error=policy.stale_if_error,
            revalidate=policy.revalidate,
        )
        self._down_until.pop(old.key, None)
        if not policy.store:
            self.store.remove(old.key)  # the origin no longer lets it be kept: this once, then gone
            return Found(stale, BYPASS)
        self.store.refresh(stale, meta)
        return Found(stale, REVALIDATED)

    def _marker(self, primary: str, vary: tuple[str, ...], marker: Optional[CachedObject], now: float) -> CachedObject:
        """The Vary marker at C{primary} recording C{vary}: the one there, or a new one replacing what is there."""
        if marker is not None and marker.meta.vary == vary and not marker.evicted:
            return marker
        meta = ObjectMeta(key=primary, size=0, etag=None, last_modified=None, content_type="", fetched_at=now,
                          expires_at=now, status=0, vary=vary, variants=secrets.token_hex(8))
        return self.store.create(meta)

    def _write_whole(self, obj: CachedObject, body: bytes) -> None:
        """A small body read whole: written and every slice committed at once."""
        if body:
            obj.write(0, body)
            for index in range(obj.slice_count):
                obj.commit_slice(index)

    def hold(self, obj: CachedObject, reader: Optional[Reader] = None) -> None:
        """
        A viewer streams from C{obj}; paired with L{let_go}.  C{reader} tells what it will read
        (see L{Reader}): it ranks the slices of an object held in memory.
        """
        self._viewers[id(obj)] = self._viewers.get(id(obj), 0) + 1
        if reader is not None:
            self._readers.setdefault(id(obj), []).append(reader)

    def let_go(self, obj: CachedObject, reader: Optional[Reader] = None) -> None:
        """
        A viewer of C{obj} is done.  When the last viewer of a transient (no-store) object leaves, its
        fetches stop: nobody will read those bytes and they are kept nowhere.
        """
        self._forget_reader(obj, reader)
        left = self._viewers.get(id(obj), 1) - 1
        if left > 0:
            self._viewers[id(obj)] = left
            self.moved(obj)  # what it wanted may make room
            return
        self._viewers.pop(id(obj), None)
        state = self._states.get(id(obj))
        if obj.transient and state is not None:
            for fetch in {id(f): f for f in state.inflight.values()}.values():
                fetch.abandon()
            self._wake(state)  # waiters left behind by the viewers that went away
        else:
            self.moved(obj)

    def _forget_reader(self, obj: CachedObject, reader: Optional[Reader]) -> None:
        readers = self._readers.get(id(obj))
        if reader is not None and readers is not None and reader in readers:
            readers.remove(reader)
            if not readers:
                del self._readers[id(obj)]

    def moved(self, obj: CachedObject) -> None:
        """A reader of C{obj} read on (or left): fetches waiting for room in memory may go on."""
        state = self._states.get(id(obj))
        if state is not None and state.blocked:
            for fetch in list(state.blocked):
                fetch.unblock()

    def _room(self, obj: CachedObject, index: int) -> bool:
        """Whether slice C{index} of C{obj} may be written now (see L{CachedObject.room_for})."""
        readers = self._readers.get(id(obj), [])
        wants: list[list[tuple[int, int]]] = []
        ss, size = obj.slice_size, obj.meta.size

        def rank(i: int) -> float:
            if not wants:  # asked only when memory is full
                wants.extend(list(reader.wanted(obj)) for reader in readers)
            lo, hi = i * ss, min((i + 1) * ss, size)
            best = math.inf
            for spans in wants:
                distance = 0
                for offset, length in spans:
                    if offset < hi and offset + length > lo:
                        best = min(best, distance + max(0, lo - offset))
                        break
                    distance += length
            return best

        return obj.room_for(index, rank, spare=len(readers))

    @property
    def busy(self) -> bool:
        """Whether any origin contact or fetch is in flight (tests and shutdown wait on this)."""
        return bool(self._contacts) or any(state.inflight for state in self._states.values())

    # -- reading --------------------------------------------------------------------------------

    def readable(self, obj: CachedObject, offset: int, limit: Optional[int] = None) -> int:
        """
        Bytes that may be read at C{offset} right now (committed, or written by a fill in flight); with
        C{limit}, an answer of at least that much may stop looking further.
        """
        n = obj.available_from(offset, limit)
        if n:
            return n
        state = self._states.get(id(obj))
        if state is not None:
            ss = obj.slice_size
            index = offset // ss
            written = state.progress.get(index)
            if written:
                return max(0, index * ss + written - offset)
            if index in state.remote and state.locks is not None:
                return max(0, index * ss + state.locks.written(index) - offset)
        return 0

    def arriving(self, obj: CachedObject, offset: int) -> bool:
        """
        Whether the bytes at C{offset} are owned by an origin body already being received: its answer
        was checked against the object (status, size, validators), so they come unless the connection
        fails; the other case is a fetch whose answer may yet say the object changed.
        """
        state = self._states.get(id(obj))
        if state is None:
            return False
        if offset // obj.slice_size in state.remote:
            return True  # another process's fetch: it writes only after checking the origin's answer
        fetch = state.inflight.get(offset // obj.slice_size)
        return fetch is not None and fetch.transport is not None and not fetch.finished

    def ensure(self, obj: CachedObject, path: str, first: int, last: int) -> None:
        """Start fetches for the slices of bytes C{first}..C{last} that are missing and not in flight."""
        if obj.meta.size == 0:
            return
        last = min(last, obj.meta.size - 1)
        ss = obj.slice_size
        state = self._state(obj, path)
        inflight, remote = state.inflight, state.remote
        run: list[int] = []
        for index in obj.missing_slices(first // ss, last // ss):
            if index in inflight or index in remote or (run and index != run[-1] + 1):
                if run:
                    self._fetch_run(state, run, path)
                    run = []
                if index in inflight or index in remote:
                    continue
            run.append(index)
        if run:
            self._fetch_run(state, run, path)

    def wait(self, obj: CachedObject, path: str, offset: int) -> "Deferred[None]":
        """
        Fires once bytes are readable at C{offset}; fails with L{FillFailed} if they never will be
        (at once for an offset outside the object: no fill brings bytes past its end).

        If the slice is owned by a fetch still more than C{steal_distance} slices behind it (a viewer
        seeking ahead of another viewer's sequential fill), that fetch's slices from here on are taken
        over by a new ranged fetch, so the viewer does not wait for the whole way in between.
        """
        if self.readable(obj, offset):
            return succeed(None)
        if not 0 <= offset < obj.meta.size:
            return fail(FillFailed(f"byte {offset} is outside {obj.meta.key}, which has {obj.meta.size}"))
        state = self._state(obj, path)
        index = offset // obj.slice_size
        owner = state.inflight.get(index)
        if owner is None:
            if index not in state.remote:
                self.ensure(obj, path, offset, offset)
        elif index - owner.position // obj.slice_size > self.steal_distance:
            self._steal(state, owner, index, path)
        d: Deferred[None] = Deferred()
        state.waiters.append((offset, d))
        if index not in state.inflight and index not in state.remote:
            self._wake(state)  # nothing fetches it (no fetch could start): the reader fails now
        return d

    async def read(self, obj: CachedObject, path: str, offset: int, length: int) -> bytes:
        """C{length} bytes at C{offset} (fewer only at the end of the object), fetching what is missing."""
        length = max(0, min(length, obj.meta.size - offset))
        if length == 0:
            return b""
        reader = _RangeReader(offset, offset + length)
        self._readers.setdefault(id(obj), []).append(reader)
        try:
            self.ensure(obj, path, offset, offset + length - 1)
            chunks = []
            while reader.position < reader.end:
                n = self.readable(obj, reader.position)
                if n == 0:
                    await self.wait(obj, path, reader.position)
                    continue
                data = obj.read(reader.position, min(n, reader.end - reader.position))
                chunks.append(data)
                reader.position += len(data)
                if obj.in_memory:
                    self.moved(obj)
            return b"".join(chunks)
        finally:
            self._forget_reader(obj, reader)
            self.moved(obj)

    # -- fetch machinery ----------------------------------------------------------------------

    def _state(self, obj: CachedObject, path: str) -> _ObjectState:
        state = self._states.get(id(obj))
        if state is None:
            state = self._states[id(obj)] = _ObjectState(obj, path)
        return state

    def _forget_if_idle(self, state: _ObjectState) -> None:
        if not state.inflight and not state.waiters and not state.progress and not state.remote:
            if self._states.get(id(state.obj)) is state:
                del self._states[id(state.obj)]

    def _locks(self, state: _ObjectState) -> Optional[SliceLocks]:
        """The object's slice locks when fills are shared (not for transient objects: nobody shares those)."""
        if self.shared is None or state.obj.transient:
            return None
        if state.locks is None:
            obj = state.obj
            state.locks = self.shared.slices(obj.meta.key, obj.token, obj.slice_size, obj.meta.size)
        return state.locks

    def _claim(self, state: _ObjectState, indexes: list[int]) -> list[int]:
        """
        Of C{indexes} (missing, not in flight here), those this process may fetch; with shared fills,
        the others are being fetched by another process and are followed (L{_follow}).
        """
        locks = self._locks(state)
        if locks is None:
            return indexes
        mine = []
        for index in indexes:
            try:
                taken = locks.take(index)
            except OSError as e:
                log.warn("fill lock of {key}: {error}; fetching without it", key=state.obj.meta.key, error=e)
                taken = TAKEN
            if taken == TAKEN:
                mine.append(index)
            elif taken == HELD:
                state.remote.add(index)
            else:
                state.remote.add(index)  # whole already: the next look takes it as present
        if state.remote and state.poller is None:
            state.poller = self.reactor.callLater(self.poll_interval, self._follow, state)
        return mine

    def _follow(self, state: _ObjectState) -> None:
        """
        Look at the slices another process fetches: a whole one is present here too; one that
        process gave up (its lock free, its count short) is fetched here.
        """
        state.poller = None
        locks, obj = state.locks, state.obj
        if locks is None:
            return
        orphaned = []
        try:
            for index in sorted(state.remote):
                if obj.has_slice(index):
                    state.remote.discard(index)
                elif locks.whole(index):
                    state.remote.discard(index)
                    obj.commit_slice(index)  # written by the other process; synced before any sidecar lists it
                elif locks.free(index):
                    state.remote.discard(index)
                    orphaned.append(index)
        except (OSError, StoreError) as e:
            log.warn("following another process's fill of {key} failed: {error}", key=obj.meta.key, error=e)
            state.remote.clear()
            state.failure = Failure(FillFailed(f"following another process's fill: {e}"))
            self._wake(state)
            state.failure = None
            return
        if orphaned:  # one origin request per run of them
            self.ensure(obj, state.path, orphaned[0] * obj.slice_size, (orphaned[-1] + 1) * obj.slice_size - 1)
        self._wake(state)
        if state.remote and state.poller is None:
            state.poller = self.reactor.callLater(self.poll_interval, self._follow, state)
        self._forget_if_idle(state)

    def _fetch_run(self, state: _ObjectState, run: list[int], path: str) -> None:
        """Fetch the slices of C{run} for C{path} (it carries the fields to forward), those that are ours."""
        mine = self._claim(state, run)
        start = 0
        for i in range(1, len(mine) + 1):  # contiguous runs of what is ours to fetch
            if i == len(mine) or mine[i] != mine[i - 1] + 1:
                self._fetch_own_run(state, mine[start:i], path)
                start = i

    def _fetch_own_run(self, state: _ObjectState, run: list[int], path: str) -> None:
        fetch = _Fetch(self, state, set(run), path)
        for index in run:
            state.inflight[index] = fetch
            state.progress.setdefault(index, 0)
        ss = state.obj.slice_size
        state.obj.reserve(min((run[-1] + 1) * ss, state.obj.meta.size) - run[0] * ss)
        d = Deferred.fromCoroutine(fetch.request(run[0] * ss, min((run[-1] + 1) * ss, state.obj.meta.size) - 1))
        d.addErrback(fetch.resume)

    def _steal(self, state: _ObjectState, owner: "_Fetch", index: int, path: str) -> None:
        run = []
        while index in owner.owned and not state.progress.get(index):
            run.append(index)
            owner.owned.discard(index)
            index += 1
        if run:
            log.info("fetching slices {a}-{b} of {key} apart from a slower fill", a=run[0], b=run[-1],
                     key=state.obj.meta.key)
            self._fetch_run(state, run, path)
            if not owner.owned:
                owner.stop()

    def _start(self, state: _ObjectState, reply: OriginReply, path: str) -> None:
        """Write C{reply}'s body into the object: it owns every missing, unowned slice it covers."""
        obj = state.obj
        ss, size = obj.slice_size, obj.meta.size
        end = reply.first + (reply.length if reply.length is not None else size - reply.first)
        # the slices whose start the body reaches: from the first starting at or after its first byte
        wanted = obj.missing_slices(-(-reply.first // ss), (min(end, size) - 1) // ss)
        if state.inflight or state.remote:
            wanted = [index for index in wanted if index not in state.inflight and index not in state.remote]
        owned = set(self._claim(state, wanted))
        if not owned:
            reply.discard()
            return
        fetch = _Fetch(self, state, owned, path)
        state.inflight.update(dict.fromkeys(owned, fetch))
        if state.progress:
            for index in owned:
                state.progress.setdefault(index, 0)
        else:
            state.progress.update(dict.fromkeys(owned, 0))
        last = obj.slice_count - 1
        obj.reserve(len(owned) * ss - ((last + 1) * ss - size if last in owned else 0))
        fetch.receive(reply)

    def _wake(self, state: _ObjectState) -> None:
        if not state.waiters:
            return
        ss = state.obj.slice_size
        keep: list[tuple[int, Deferred[None]]] = []
        ready: list[tuple[Deferred[None], bool]] = []
        for offset, d in state.waiters:
            if self.readable(state.obj, offset):
                ready.append((d, True))
            elif offset // ss not in state.inflight and offset // ss not in state.remote \
                    and not state.obj.has_slice(offset // ss):
                ready.append((d, False))  # nothing will fill it: fail the reader
            else:
                keep.append((offset, d))
        state.waiters = keep
        failure = None  # made only when a reader is failed (a Failure per wake-up cost ~1% of a cold fill)
        for d, ok in ready:
            if ok:
                d.callback(None)
            else:
                if failure is None:
                    failure = state.failure or Failure(FillFailed("the origin fetch for these bytes failed"))
                d.errback(failure)
        self._forget_if_idle(state)


@define(eq=False)
class _RangeReader:
    """L{Filler.read}'s reader: one range, read from its start."""

    position: int
    end: int

    def wanted(self, obj: CachedObject) -> Iterable[tuple[int, int]]:
        return [(self.position, self.end - self.position)]


class _Fetch:
    """
    One origin body (and its resumptions) writing the slices it owns into one object.  Into an
    object held in memory it writes a slice only when there is room for it; until then it is
    I{blocked}: the origin socket is paused and what it had already received waits in C{stash}.
    """

    def __init__(self, filler: Filler, state: _ObjectState, owned: set[int], path: str) -> None:
        self.filler = filler
        self.state = state
        self.owned = owned
        self.path = path  # what its requests (and resumptions) ask the origin for, with the fields they forward
        self.position = 0
        self.resumes = 0  # resumptions since the last one that brought new bytes
        self.resumed_at = -1  # position at the last resumption
        self.transport: Any = None
        self.idle: Any = None
        self.reply: Optional[OriginReply] = None
        self.finished = False
        self.began = filler.reactor.seconds()
        self.stash: Optional[list[bytes]] = None  # received while blocked (None: not blocked)
        self.blocked_at = -1  # the slice it waits to have room for
        self.lost: Optional[Failure] = None  # the body ended while blocked

    # the IProtocol that receives the origin body
    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._arm_idle()

    def _arm_idle(self) -> None:
        if self.idle is not None and self.idle.active():
            self.idle.reset(self.filler.idle_timeout)
        else:
            self.idle = self.filler.reactor.callLater(self.filler.idle_timeout, self._timed_out)

    def _timed_out(self) -> None:
        if self.stash is not None:
            self._blocked_too_long()
            return
        log.warn("origin body idle for {s}s at byte {pos}; dropping it", s=self.filler.idle_timeout, pos=self.position)
        if self.reply is not None:
            self.filler.origin.body_failed(self.reply.url)  # resume from another origin, if there is one
        if self.transport is not None:
            self.transport.stopProducing()

    def _blocked_too_long(self) -> None:
        """
        Nobody made room for a whole idle timeout (a paused viewer): drop the origin body rather than
        hold its connection; the slices are fetched again when a reader needs them.
        """
        state = self.state
        log.info("fill of {key} waited {s}s for room at byte {pos}; dropping its origin body",
                 key=state.obj.meta.key, s=self.filler.idle_timeout, pos=self.position)
        self.abandon()
        for offset, _ in list(state.waiters):
            self.filler.ensure(state.obj, state.path, offset, offset)
        self.filler._wake(state)

    async def request(self, first: int, last: int) -> None:
        meta = self.state.obj.meta
        validator = meta.etag if meta.etag and not meta.etag.startswith("W/") else meta.last_modified
        conditional = {"If-Range": validator} if validator else None
        self.position = first
        reply = await self.filler.origin.fetch(self.path, first, last, conditional, via=self.filler.via)
        self.check(reply)
        self.receive(reply)

    def check(self, reply: OriginReply) -> None:
        """
        The answer must be the object's: its status (a 206 or a 200 for a 200 object), size and
        validators.  A 4xx means the object is gone (L{OriginStatus}: it is dropped), another
        status that the origin fails; other validators or size mean it changed (L{ObjectChanged}).
        """
        meta = self.state.obj.meta
        if not (reply.code == meta.status or (reply.code == 206 and meta.status == 200)):
            reply.discard()
            if 400 <= reply.code < 500:
                raise OriginStatus(reply.code, f"{reply.url}: the origin now answers {reply.code}")
            raise OriginUnavailable(f"{reply.url}: unexpected status {reply.code} while filling")
        changed = (
            reply.total != meta.size
            or (meta.etag is not None and reply.header("ETag") not in (None, meta.etag))
            or (meta.last_modified is not None and reply.header("Last-Modified") not in (None, meta.last_modified))
        )
        if changed:
            reply.discard()
            if self.filler.store.get(meta.key) is self.state.obj:
                self.filler.store.remove(meta.key)
            raise ObjectChanged(f"{meta.key} changed at the origin during the fill")

    def receive(self, reply: OriginReply) -> None:
        self.reply = reply
        self.position = reply.first
        reply.deliver(self)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            if self.transport is not None:
                self.transport.stopProducing()
            return
        self.filler.origin_bytes += len(data)
        self.filler.observer.origin_bytes(self.reply.url if self.reply is not None else "", len(data))
        if self.stash is not None:
            self.stash.append(data)  # received before the pause took hold (at most one socket read)
            return
        self._arm_idle()
        self._write_body(data)

    def _write_body(self, data: bytes) -> None:
        state, obj = self.state, self.state.obj
        ss, size = obj.slice_size, obj.meta.size
        view = memoryview(data)
        i, position = 0, self.position
        try:
            while i < len(view) and position < size:
                index = position // ss
                slice_start = index * ss
                slice_end = min(slice_start + ss, size)
                n = min(len(view) - i, slice_end - position)
                if state.inflight.get(index) is self:
                    written_to = slice_start + state.progress.get(index, 0)
                    if position < written_to:
                        n = min(n, written_to - position)  # already written (a resend from earlier): skip
                    elif position == written_to:
                        if obj.in_memory and not self.filler._room(obj, index):
                            self._block(index, view[i:], position)
                            return
                        obj.write(position, view[i : i + n])
                        written = state.progress[index] = state.progress[index] + n
                        if state.locks is not None and not obj.in_memory:
                            # after the bytes: readers elsewhere follow (not bytes held in our memory:
                            # they take the slice up from its last count when we release it)
                            state.locks.wrote(index, written)
                        if slice_start + written == slice_end:
                            obj.commit_slice(index)
                            del state.inflight[index]
                            del state.progress[index]
                            self.owned.discard(index)
                            if state.locks is not None:
                                state.locks.release(index)
                    # position > written_to cannot happen: bodies are contiguous and start at or before it
                i += n
                position += n
        except (StoreError, OSError) as e:
            self.position = position
            self.fail(Failure(e))
            return
        finally:
            self.filler._wake(state)
        self.position = position
        if not self.owned:
            # everything we own is in; an origin that ignored Range may still be sending: stop it
            self.finished = True
            self._cancel_idle()
            reply = self.reply
            self.filler.observer.fill_done(self.state.obj.meta.key, reply.url if reply else "", self._age())
            more = reply is None or reply.length is None or position < reply.first + reply.length
            if self.transport is not None and more:
                self.transport.stopProducing()

    def _age(self) -> float:
        return float(self.filler.reactor.seconds() - self.began)

    def _block(self, index: int, rest: memoryview, position: int) -> None:
        """No room for slice C{index} (in memory): pause the origin and keep C{rest} until there is."""
        self.position = position
        self.stash = [bytes(rest)]
        self.blocked_at = index
        self.state.blocked.append(self)
        self._arm_idle()  # a viewer paused for that long: see _blocked_too_long
        if self.transport is not None:
            self.transport.pauseProducing()

    def unblock(self) -> None:
        """Room may have come: write what waits and read the origin on, or stay blocked."""
        if self.stash is None or self.finished or not self.filler._room(self.state.obj, self.blocked_at):
            return
        data, lost = b"".join(self.stash), self.lost
        self._leave_blocked()
        self._write_body(data)
        if self.finished:
            return
        if self.stash is not None:  # blocked again
            self.lost = lost
            return
        if lost is not None:
            self.connectionLost(lost)
        elif self.transport is not None:
            self._arm_idle()
            self.transport.resumeProducing()

    def _leave_blocked(self) -> None:
        self.stash = None
        self.lost = None
        if self in self.state.blocked:
            self.state.blocked.remove(self)

    def _release_owned(self) -> None:
        """Give up every slice we own that is still ours (their partial bytes are dropped)."""
        state = self.state
        for index in list(self.owned):
            if state.inflight.get(index) is self:
                del state.inflight[index]
                if state.progress.pop(index, 0):
                    state.obj.drop_partial(index)
                if state.locks is not None:
                    state.locks.release(index)
        self.owned.clear()

    def abandon(self) -> None:
        """Nobody needs our slices any more: release them (their partial bytes are dropped) and stop."""
        self._release_owned()
        self.stop()
        self.filler._forget_if_idle(self.state)

    def stop(self) -> None:
        """Every slice we owned went to other fetches: drop the origin body."""
        self.finished = True
        self._leave_blocked()
        self._cancel_idle()
        if self.transport is not None:
            self.transport.stopProducing()

    def _cancel_idle(self) -> None:
        if self.idle is not None and self.idle.active():
            self.idle.cancel()
        self.idle = None

    def connectionLost(self, reason: Failure) -> None:
        self.transport = None
        if self.stash is not None and not self.finished:
            self.lost = reason  # what the origin sent before waits in the stash: go on after it
            return
        self._cancel_idle()
        if self.finished or not self.owned:
            self.finished = True
            self.filler._forget_if_idle(self.state)
            return
        self.filler.observer.origin_failed(self.reply.url if self.reply is not None else "", "body_cut")
        self.resume(reason)

    def resume(self, why: Failure) -> None:
        """The body ended early or the request failed: ask again for what is still missing, or give up."""
        if self.finished:
            return
        if why.check(ObjectChanged, StoreError, OriginStatus) or self.resumes >= self.filler.max_resumes:
            self.fail(why if self.resumes < self.filler.max_resumes else
                      Failure(FillFailed(f"origin failed {self.resumes + 1} times: {why.getErrorMessage()}")))
            return
        if self.position > self.resumed_at:
            self.resumes = 0  # the last attempt made progress: an origin that drops long bodies still completes
        self.resumed_at = self.position
        self.resumes += 1
        state, obj = self.state, self.state.obj
        ss = obj.slice_size
        first_index = min(self.owned)
        first = first_index * ss + state.progress.get(first_index, 0)
        last = min((max(self.owned) + 1) * ss, obj.meta.size) - 1
        log.info("origin body for {key} stopped at byte {pos}; resuming from {first} ({why})",
                 key=obj.meta.key, pos=self.position, first=first, why=why.getErrorMessage())
        delay = 0.05 * 2 ** (self.resumes - 1)  # the origin may need a moment after dropping us

        def again() -> None:
            if self.finished:
                return
            d = Deferred.fromCoroutine(self.request(first, last))
            d.addErrback(self.resume)

        self.filler.reactor.callLater(delay, again)

    def fail(self, failure: Failure) -> None:
        """Give up: release owned slices (their partial bytes are never trusted) and fail their readers."""
        if self.finished:
            return
        self.finished = True
        self._leave_blocked()
        self._cancel_idle()
        if self.transport is not None:
            self.transport.stopProducing()
        state = self.state
        log.warn("fill of {key} failed: {why}", key=state.obj.meta.key, why=failure.getErrorMessage())
        self.filler.observer.fill_failed(state.obj.meta.key, failure.getErrorMessage())
        if failure.check(StoreError, OriginStatus) and self.filler.store.get(state.obj.meta.key) is state.obj:
            self.filler.store.remove(state.obj.meta.key)  # a disk error, or the object is gone at the origin
        self._release_owned()
        state.failure = failure if failure.check(EdgeError) else Failure(FillFailed(failure.getErrorMessage()))
        self.filler._wake(state)
        state.failure = None

