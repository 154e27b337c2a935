# -*- test-case-name: tests.test_edge,tests.test_sendfile -*-
"""
The one producer every answer goes through: it streams a L{Plan}'s parts to a twisted.web request.

Literal parts are written as they are.  Span parts are read from the object's data file in bounded
chunks; where the bytes are not there yet, the producer asks the L{Filler} to fetch them and waits, so
hits, misses, partial hits, seeks and ranges all take the same road.  It is a push producer: when the
viewer's socket buffer is full, Twisted pauses it and nothing more is read until it resumes.

On a plain TCP connection, span bytes that are already readable go out with C{os.sendfile} instead
(zero copy, see L{_SendfileRun}); literal parts and bytes still being fetched take the path above,
and so do objects held in memory (transient, or uncached by a full disk), whose fill waits for this
producer to read on (L{PlanProducer.wanted}, L{Filler.moved}).

An answer may be paced (L{Throttle}, made by a L{ThrottlePolicy}): after a burst at full speed, the
producer hands the transport no more than the rate allows and waits on a timer for the rest.  Only
what goes to the viewer is paced; the fill behind it fetches at the origin's pace.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Mapping, Optional

from attrs import define
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from h264edge._twisted_compat import (
    flush_now,
    transport_connected,
    transport_open,
    transport_producer,
    want_writable,
)
from h264edge.fill import Filler, FillFailed
from h264edge.plan import Literal, Plan
from h264edge.store import CachedObject, StoreError
from h264edge.tcpio import plain_tcp, queued

log = Logger()

CHUNK = 64 * 1024  # copy-path reads: small enough that 1,000 slow viewers stay cheap
SENDFILE_MIN = 16 * 1024
"""
Readable runs shorter than this are copied: one reactor turn to borrow the socket costs more.  (A
run already holding the socket takes on any size, see L{_SendfileRun._follow}.)
"""
SENDFILE_CHUNK = 2 * 2**20
"""Bytes asked of one os.sendfile call (as nginx's sendfile_max_chunk): the socket buffer refills sooner."""
SENDFILE_BUDGET = 8 * 2**20
"""At most this many bytes are sendfile'd per writable event, so one fast viewer cannot hog the reactor."""


@define
class Throttle:
    """
    One answer's pace: C{burst} bytes at full speed, then at most C{rate} bytes a second.  While
    C{rate} is None (not known yet: a clip's bitrate still being read) nothing is held back; pacing
    then starts from what was sent by then.
    """

    rate: Optional[float] = None
    burst: int = 0
    _base: int = 0
    _since: Optional[float] = None

    def allowance(self, sent: int, now: float) -> Optional[int]:
        """Bytes that may go now, after C{sent} bytes; None for no limit."""
        if self.rate is None:
            return None
        if sent < self.burst:
            return self.burst - sent
        if self._since is None:
            self._base, self._since = sent, now
        return max(0, self._base + int(self.rate * (now - self._since)) - sent)

    @property
    def quantum(self) -> int:
        """The least the producer waits for: a twentieth of a second's worth, 4-64 KiB."""
        return max(4096, min(CHUNK, int((self.rate or 0) / 20)))


@define
class ThrottlePolicy:
    """
    Which answers are paced and how (C{--limit-rate}, C{--limit-rate-after}, C{--mp4-limit-rate},
    C{--mp4-limit-rate-after}, as nginx's C{limit_rate} and C{mp4_limit_rate}): MP4 answers at
    C{mp4_factor} times the clip's bitrate after C{mp4_after} seconds' worth of it, other answers
    (and MP4s whose bitrate cannot be read) at C{rate} bytes/s after C{rate_after} bytes.

    @ivar bitrate_of: C{(object, origin path) -> Deferred} of the clip's bytes per second of media
        (None when it has none), e.g. L{EdgeResource.clip_bitrate}.
    """

    rate: int = 0
    rate_after: int = 0
    mp4_factor: float = 0.0
    mp4_after: float = 60.0
    bitrate_of: Optional[Callable[[CachedObject, str], "Deferred[Optional[float]]"]] = None

    def throttle_for(self, uri: bytes, objects: Mapping[str, CachedObject], paths: Mapping[str, str]
                     ) -> Optional[Throttle]:
        """The pace of an answer to C{uri} made of C{objects}' bytes, or None to send it at full speed."""
        plain = Throttle(float(self.rate), self.rate_after) if self.rate > 0 else None
        if (
            self.mp4_factor <= 0
            or self.bitrate_of is None
            or len(objects) != 1
            or not uri.partition(b"?")[0].lower().endswith(_MP4_SUFFIXES)
        ):
            return plain
        throttle = Throttle()
        [(key, obj)] = objects.items()

        def known(bitrate: Optional[float]) -> None:
            if bitrate:
                # the moov's word sets the pace: a lying duration (timescale 1) made a 1.8 MB clip claim
                # 20,000 s and go out at 90 bytes/s, a viewer hung in all but name; no real clip is
                # slower than MIN_MP4_PACE (128 kbit/s), so the pace never goes below it
                rate = max(bitrate * self.mp4_factor, MIN_MP4_PACE)
                throttle.rate, throttle.burst = rate, int(max(bitrate, MIN_MP4_PACE) * self.mp4_after)
            elif plain is not None:
                throttle.rate, throttle.burst = plain.rate, plain.burst

        def failed(failure: Failure) -> None:
            known(None)

        self.bitrate_of(obj, paths[key]).addCallbacks(known, failed)
        return throttle


MIN_MP4_PACE = 16 * 1024.0
"""Bytes per second under which C{--mp4-limit-rate} never paces an answer, whatever its moov says."""

_MP4_SUFFIXES = (b".mp4", b".m4v", b".mov", b".m4a", b".3gp")


@define
class SendfileCounters:
    """What went out by C{os.sendfile} since start (for tests and metrics)."""

    answers: int = 0  # answers that sent at least one run by sendfile
    runs: int = 0
    bytes: int = 0
    parks: int = 0  # times a run waited at a fill's frontier, keeping the socket


counters = SendfileCounters()


def sendfile_socket(request: Request) -> Optional[int]:
    """
    The socket descriptor C{request}'s body may be sendfile'd into, or C{None} if it must be written.

    Only a plain (not TLS) TCP connection of the HTTP/1.x channel qualifies, and only while that
    channel holds the transport's producer slot (an HTTP/2 stream or a TLS wrapper never does), with
    a Content-Length set, so the body needs no framing.
    """
    if not hasattr(os, "sendfile") or request.method == b"HEAD":
        return None
    channel = request.channel
    transport: Any = getattr(channel, "transport", None)
    if (
        not plain_tcp(transport)
        or transport_producer(transport) != (channel, True)
        or not request.responseHeaders.hasHeader(b"Content-Length")
    ):
        return None
    fd = transport.fileno()
    return fd if isinstance(fd, int) and fd >= 0 else None


@implementer(IPushProducer)
class PlanProducer:
    """
    Streams C{plan} into C{request} and finishes it; on a fill failure or a disk error mid-body the
    connection is aborted (with one warning), so the viewer sees a short body (Content-Length tells
    it) and never wrong bytes.  A plan whose spans reach past the end of their object fails before
    its first byte: those bytes would never come.

    @param objects: the cached object for each key a span of the plan names.
    @param paths: the origin path for each key (for fetches of missing slices).
    @ivar use_sendfile: send readable span bytes with C{os.sendfile} where L{sendfile_socket} allows.
    @ivar sent: body bytes handed to the transport (or the kernel), whichever way they went.
    """

    use_sendfile = True
    throttle_policy: Optional[ThrottlePolicy] = None

    def __init__(
        self,
        request: Request,
        plan: Plan,
        objects: Mapping[str, CachedObject],
        paths: Mapping[str, str],
        filler: Filler,
        chunk: int = CHUNK,
        on_early_failure: Optional[Callable[[Failure], None]] = None,
    ) -> None:
        self.request = request
        self.parts = plan.parts
        self.objects = objects
        self.paths = paths
        self.filler = filler
        self.chunk = chunk
        self.on_early_failure = on_early_failure  # answers an error status if nothing was sent yet
        self._part = 0
        self._done_in_part = 0
        self._paused = False
        self._stopped = False
        self._waiting: Optional[Deferred[None]] = None
        self._pumping = False
        self._socket: Optional[int] = None
        self._run: Optional[_SendfileRun] = None
        self._sendfile_used = False
        self._held: list[CachedObject] = []
        self.sent = 0
        self._throttle: Optional[Throttle] = None
        self._throttle_wait: Any = None  # the timer of a paced answer waiting for its allowance
        self._left = sum(part.length for part in self.parts)

    def start(self) -> None:
        for span in self.parts:
            if isinstance(span, Literal):
                continue
            size = self.objects[span.key].meta.size
            if span.offset + span.length > size:
                self._abort(Failure(FillFailed(
                    f"the answer needs bytes {span.offset}-{span.offset + span.length - 1} of {span.key}, "
                    f"which has {size}")))
                return
        if self.throttle_policy is not None:
            self._throttle = self.throttle_policy.throttle_for(self.request.uri, self.objects, self.paths)
        self._held = list({id(obj): obj for obj in self.objects.values()}.values())
        for obj in self._held:
            self.filler.hold(obj, self)
        self.request.notifyFinish().addBoth(self._let_go)
        if self.use_sendfile:
            self._socket = sendfile_socket(self.request)
        self.request.registerProducer(self, True)
        # ask for every missing slice up front so the origin streams while we send what we have
        for part in self.parts:
            if not isinstance(part, Literal) and part.length:
                obj = self.objects[part.key]
                if self.filler.readable(obj, part.offset) < part.length:
                    self.filler.ensure(obj, self.paths[part.key], part.offset, part.offset + part.length - 1)
        self._pump()
        self._flush_now()

    def _flush_now(self) -> None:
        """
        Send what the first pump buffered (headers, the start of a rewritten moov) now, rather than
        on the reactor's next turn: the time to first byte of a warm seek is a few hundred us, and
        that turn was a tenth of it.  Plain TCP only, and only while the channel holds the
        transport (a sendfile run flushes for itself).
        """
        transport: Any = getattr(self.request.channel, "transport", None)
        if (
            self._socket is not None
            and self._run is None
            and not self._stopped
            and plain_tcp(transport)
            and transport_producer(transport)[0] is self.request.channel
            and queued(transport)
        ):
            flush_now(transport)

    def _let_go(self, result: object = None) -> None:
        """The answer ended (sent, aborted or the viewer left): the objects need us no more."""
        held, self._held = self._held, []
        for obj in held:
            self.filler.let_go(obj, self)

    def wanted(self, obj: CachedObject) -> Iterator[tuple[int, int]]:
        """The spans of C{obj} this answer has still to send, in order, as C{(offset, length)}."""
        for number in range(self._part, len(self.parts)):
            part = self.parts[number]
            if isinstance(part, Literal) or self.objects[part.key] is not obj:
                continue
            done = self._done_in_part if number == self._part else 0
            if part.length > done:
                yield part.offset + done, part.length - done

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._waiting is None and self._run is None and self._throttle_wait is None:
            self._pump()

    def stopProducing(self) -> None:
        self._stopped = True
        self._unpace()
        if self._run is not None:
            self._run.cancel()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            self._pump_loop()
        finally:
            self._pumping = False

    def _pump_loop(self) -> None:
        while not self._paused and not self._stopped and self._run is None:
            if self._part >= len(self.parts):
                self._finish()
                return
            part = self.parts[self._part]
            remaining = part.length - self._done_in_part
            if remaining == 0:
                self._part += 1
                self._done_in_part = 0
                continue
            budget = self.chunk if self._throttle is None else self._paced()
            if budget == 0:
                return  # a timer resumes the pump
            in_memory = None
            if isinstance(part, Literal):
                data = part.data[self._done_in_part : self._done_in_part + min(self.chunk, budget)]
            else:
                obj = self.objects[part.key]
                position = part.offset + self._done_in_part
                ready = self.filler.readable(obj, position, remaining)
                if ready == 0:
                    self._wait(obj, self.paths[part.key], position)
                    return
                run = min(ready, remaining)
                if self._throttle is not None:
                    run = min(run, budget)
                if obj.in_memory:
                    in_memory = obj  # no file to sendfile from; its fill waits for us to read on
                elif self._socket is not None and run >= SENDFILE_MIN and self._start_run(obj, position, run):
                    continue  # the run goes on by itself, or it is already over (see _SendfileRun)
                try:
                    data = obj.read(position, min(run, self.chunk))
                except (StoreError, OSError) as e:  # the store has dropped the object (see CachedObject.read)
                    self._abort(Failure(e))
                    return
                if not data:
                    self._abort(Failure(EOFError(f"short read at {position} of {part.key}")))
                    return
            self._done_in_part += len(data)
            self.sent += len(data)
            self.request.write(data)
            if in_memory is not None:
                self.filler.moved(in_memory)

    # -- pacing ---------------------------------------------------------------------------------

    def _paced(self) -> int:
        """
        Bytes the throttle lets go now, 0 after setting a timer.  While its rate is not known yet,
        L{SENDFILE_BUDGET} at a time, so that a sendfile run ends and the rate is looked at again.
        """
        throttle = self._throttle
        assert throttle is not None
        clock = self.filler.reactor
        allowed = throttle.allowance(self.sent, clock.seconds())
        if allowed is None:
            return SENDFILE_BUDGET
        wanted = min(throttle.quantum, self._left - self.sent)
        if allowed >= wanted or (allowed > 0 and self.sent < throttle.burst):  # the burst's rest goes now
            return allowed
        assert throttle.rate is not None
        self._throttle_wait = clock.callLater((wanted - allowed) / throttle.rate, self._paced_again)
        return 0

    def _paced_again(self) -> None:
        self._throttle_wait = None
        if not self._paused and self._waiting is None and self._run is None:
            self._pump()

    def _unpace(self) -> None:
        if self._throttle_wait is not None and self._throttle_wait.active():
            self._throttle_wait.cancel()
        self._throttle_wait = None

    @property
    def paced(self) -> bool:
        """Whether a throttle holds this answer back: its sendfile runs end at their length."""
        return self._throttle is not None

    # -- sendfile -------------------------------------------------------------------------------

    def _start_run(self, obj: CachedObject, position: int, length: int) -> bool:
        """Hand C{length} readable bytes at C{position} to a L{_SendfileRun}; False to copy them instead."""
        request = self.request
        channel = request.channel
        transport = getattr(channel, "transport", None)
        socket_fd = sendfile_socket(request)
        if socket_fd is None or socket_fd != self._socket or transport is None:
            self._socket = None  # the connection changed under us: copy from now on
            return False
        if not request.startedWriting:
            request.write(b"")  # the headers go first, through the transport's buffer
        if request.chunked or request.finished or self._stopped:
            self._socket = None
            return False
        if not self._sendfile_used:
            self._sendfile_used = True
            counters.answers += 1
        counters.runs += 1
        self._run = _SendfileRun(self, transport, channel, socket_fd, obj.fileno(), position, length)
        self._run.begin()
        return True

    def _span_left(self) -> Optional[tuple[CachedObject, str, int, int]]:
        """The object, origin path, position and length of what a run has left of its span (None: nothing)."""
        if self._part >= len(self.parts):
            return None
        part = self.parts[self._part]
        left = part.length - self._done_in_part
        if left == 0 or isinstance(part, Literal):
            return None
        return self.objects[part.key], self.paths[part.key], part.offset + self._done_in_part, left

    def _sent_by_run(self, count: int) -> None:
        self._done_in_part += count
        self.sent += count
        self.request.sentLength += count  # the access log's byte count; request.write is bypassed
        counters.bytes += count

    def _run_ended(self) -> None:
        self._run = None
        if not self._paused:
            self._pump()

    def _viewer_gone(self) -> None:
        """sendfile met a reset or broken pipe: the viewer left; drop the connection quietly."""
        self._stopped = True
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None:
            transport.abortConnection()

    # -- waiting and ending ---------------------------------------------------------------------

    def _wait(self, obj: CachedObject, path: str, position: int) -> None:
        d = self._waiting = self.filler.wait(obj, path, position)
        if (
            not d.called
            and not self.request.startedWriting
            and self.filler.arriving(obj, position)
            and not self.filler.store.disk_trouble
        ):
            # A miss: the origin's answer was checked and its body is on the way.  The viewer gets
            # the headers now rather than with the first body bytes (0.2-0.7 ms later: the body's
            # first write into the store).  A body that then fails before its first byte resumes
            # from the origin like any other; if that fails too, the connection is aborted short of
            # its Content-Length instead of answering 502.  (A fetch still waiting for its answer,
            # which may say the object changed, keeps the headers back; so does a miss while the
            # disk has been refusing writes: its first write may fail too, and then it gets a 503.)
            self.request.write(b"")
            self._flush_now()

        def ready(_: Any) -> None:
            self._waiting = None
            if not self._paused:
                self._pump()

        def failed(failure: Failure) -> None:
            self._waiting = None
            self._abort(failure)

        d.addCallbacks(ready, failed)

    def _finish(self) -> None:
        self._stopped = True
        self._unpace()
        self.request.unregisterProducer()
        self.request.finish()

    def _abort(self, failure: Failure) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._unpace()
        log.warn(
            "aborting {uri} after {sent} bytes: {why}",
            uri=self.request.uri,
            sent=self.sent,
            why=failure.getErrorMessage(),
        )
        self.request.unregisterProducer()
        if not self.request.startedWriting and self.on_early_failure is not None:
            self.on_early_failure(failure)  # no byte went out yet: a proper error answer is still possible
            return
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None:
            transport.abortConnection()


@implementer(IPullProducer)
class _SendfileRun:
    """
    Sends C{length} bytes of the file C{file_fd} from C{offset} into the TCP socket C{sock_fd} with
    non-blocking C{os.sendfile}, borrowing the transport's producer slot from the HTTP channel.

    The contract with Twisted's C{FileDescriptor} (C{twisted.internet.abstract}):

      - L{begin} swaps the channel out of C{transport.registerProducer} and this pull producer in.
        The transport then calls L{resumeProducing} only from C{doWrite}, when its own buffer (the
        headers, a literal part) is empty, so bytes never overtake what was written before.
      - Each call sends until the socket would block (then C{transport.startWriting()} asks for the
        next writable event) or until L{SENDFILE_BUDGET} bytes went (the same, so other connections
        get their turn).
      - When all bytes went, the channel gets its slot back and the owning L{PlanProducer} goes on
        with the rest of its plan.  Nothing may write to the transport meanwhile; the channel only
        buffers pipelined requests while a request is being answered, so nothing does.
      - A lost connection calls L{stopProducing} (the transport then forgets its producer by
        itself); a reset or broken pipe seen by sendfile aborts the connection without a log; a
        disk error aborts it with a warning, like the copying path.  The file descriptor belongs to
        the L{CachedObject}, which the owner keeps referenced; the run never closes it.
    """

    def __init__(
        self,
        owner: PlanProducer,
        transport: Any,
        channel: Any,
        sock_fd: int,
        file_fd: int,
        offset: int,
        length: int,
    ) -> None:
        self.owner = owner
        self.transport = transport
        self.channel = channel
        self.sock_fd = sock_fd
        self.file_fd = file_fd
        self.offset = offset
        self.remaining = length
        self._primed = False
        self._over = False
        self._parked = False

    def begin(self) -> None:
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, False)  # calls resumeProducing at once: see there

    # IPullProducer
    def resumeProducing(self) -> None:
        if self._over:
            return
        if not self._primed:
            # registerProducer's own call: the transport's buffer may still hold the headers, so
            # wait for doWrite, which calls us only once that buffer is empty.  It runs now rather
            # than on the next writable event: a fresh socket takes the headers at once, and doWrite
            # then calls us back to start sending, a reactor turn sooner (an error it meets is met
            # again by the reactor's own doWrite, which startWriting asked for).
            self._primed = True
            want_writable(self.transport)
            flush_now(self.transport)
            return
        transport = self.transport
        if self.owner._stopped or not transport_open(transport):
            self.cancel()  # the connection is closing: whoever closes it stops the owner
            return
        if self._parked:
            return
        budget = SENDFILE_BUDGET
        while self.remaining or self._follow():
            want = min(self.remaining, budget, SENDFILE_CHUNK)
            try:
                sent = os.sendfile(self.sock_fd, self.file_fd, self.offset, want)
            except BlockingIOError:
                break
            except ConnectionError:
                self._end()
                self.owner._viewer_gone()
                return
            except OSError as e:
                self._end()
                self.owner._abort(Failure(e))
                return
            if sent == 0:
                self._end()
                self.owner._abort(Failure(EOFError(f"sendfile hit the end of the file at {self.offset}")))
                return
            self.offset += sent
            self.remaining -= sent
            budget -= sent
            self.owner._sent_by_run(sent)
            if budget <= 0:
                break  # our turn is over
        if self.remaining or (budget <= 0 and self.owner._span_left() is not None):
            want_writable(transport)  # the next writable event goes on (and takes on more, see _follow)
            return
        if self._parked or self._over:
            return  # the fill wakes us (see _follow), or the answer was aborted
        self._end()
        self.owner._run_ended()

    def _follow(self) -> bool:
        """
        All the bytes the run was given went out: take on what is readable next in the same span, or,
        at the frontier of a fill (a miss), park and wait for it, keeping the transport's producer
        slot.  A cold miss otherwise started a new run (the slot swapped twice, the checks redone)
        for every origin read.  False when the span is done: the run ends.
        """
        left = self.owner._span_left()
        if left is None or self.owner._stopped or self.owner.paced:
            return False
        obj, path, position, length = left
        if obj.in_memory:
            return False  # uncached meanwhile (a full disk): the owner copies from memory
        ready = self.owner.filler.readable(obj, position, length)
        if ready:
            self.remaining = min(ready, length)
            return True
        d = self.owner.filler.wait(obj, path, position)
        if d.called:
            # at once: only a failure can be (nothing was readable just now).  The run ends; the
            # owner's pump waits for the same bytes, meets the same failure and aborts its own way.
            d.addErrback(lambda _: None)
            return False
        self._parked = True
        counters.parks += 1
        d.addCallbacks(self._unpark, self._park_failed)
        return False

    def _unpark(self, _: object) -> None:
        self._parked = False
        if self._over:
            return
        if queued(self.transport):
            # nothing writes to the transport while a run holds it; if that ever changes, the
            # bytes queued before go first: doWrite calls us once its buffer is empty
            want_writable(self.transport)
            return
        self.resumeProducing()

    def _park_failed(self, failure: Failure) -> None:
        self._parked = False
        if not self._over:
            self._end()
            self.owner._abort(failure)

    def stopProducing(self) -> None:
        """The connection is lost; the transport drops its reference to us itself."""
        self._over = True
        self.owner._run = None
        self.owner._stopped = True

    def cancel(self) -> None:
        """The owner stopped: give the slot back if the connection still lives."""
        self._end()
        self.owner._run = None

    def _end(self) -> None:
        if self._over:
            return
        self._over = True
        transport = self.transport
        if transport_producer(transport)[0] is self:
            transport.unregisterProducer()
            if transport_connected(transport):
                transport.registerProducer(self.channel, True)
