# -*- test-case-name: tests.test_twisted_compat -*-
"""
Every use h264edge makes of Twisted's and treq's private or undocumented internals, in one place.

The edge reaches below the public API where the public API has nothing to offer: the HTTP channel's
parser state (to answer small hits without a Request, and to refuse a request body before it is
read), a Site's access-log internals (to write hot answers' log lines cheaply), a TCP transport's
buffers, socket and producer slot (to send at once and to lend the socket to os.sendfile), the HTTP
client's connection protocol (to never reuse a connection that got bytes after its answer, and to
see the framing fields its parser keeps to itself), and treq's response wrapper.  None of these names is promised to stay; each is read here only, behind a
function that says what it means, and C{tests.test_twisted_compat} checks that meaning on the
installed Twisted (CI runs it on the oldest Twisted setup.cfg allows and on the newest).

Where an internal is missing, the function says so (L{channel_state_known} False, L{access_log_sink}
None, ...) and the caller takes the public road instead, slower but correct.
"""

from __future__ import annotations

import select
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

if TYPE_CHECKING:
    from twisted.web.server import Request, Site

__all__ = [
    "TreqResponse",
    "access_log_sink",
    "answer_connection_fields",
    "channel_is_idle",
    "channel_state_known",
    "channel_waiting_for_transport",
    "close_now",
    "flush_now",
    "pending_method",
    "plain_tcp",
    "queued_bytes",
    "read_now",
    "reopen_access_log",
    "request_disconnected",
    "send_socket",
    "set_read_size",
    "socket_writable",
    "strict_client_connections",
    "tcp_transport",
    "transport_connected",
    "transport_open",
    "transport_producer",
    "treq_raw_response",
    "want_writable",
]

#: treq's response wrapper (C{treq.response._Response}); only for annotations.
TreqResponse = Any

# -- the HTTP/1.x channel ---------------------------------------------------------------------------

_CHANNEL_STATE = ("requests", "_handlingRequest", "_dataBuffer", "_waitingForTransport", "_buffer", "line_mode",
                  "_HTTPChannel__first_line", "persistent")


def _channel_state_known() -> bool:
    channel = HTTPChannel()
    return all(hasattr(channel, name) for name in _CHANNEL_STATE)


_STATE_KNOWN = _channel_state_known()


def channel_state_known() -> bool:
    """Whether this Twisted's L{HTTPChannel} has the parser state L{channel_is_idle} reads."""
    return _STATE_KNOWN


def channel_is_idle(channel: HTTPChannel) -> bool:
    """
    Whether C{channel} is between requests: no request received or being answered, no byte of a
    next request buffered (not even the bare CRLF Twisted skips once before a request), not paused
    by its transport, still persistent.  Then the next bytes it receives start a new request.
    False whenever Twisted's state cannot be read (L{channel_state_known}).
    """
    if not _STATE_KNOWN:
        return False
    c: Any = channel
    return bool(
        not c.requests
        and not c._handlingRequest
        and not c._waitingForTransport
        and not c._buffer
        and not c._dataBuffer
        and c.line_mode
        and c._HTTPChannel__first_line == 1
        and c.persistent
        and not getattr(c, "paused", False)
    )


def channel_waiting_for_transport(channel: HTTPChannel) -> bool:
    """Whether C{channel}'s transport asked it to stop producing (its send buffer is full)."""
    return bool(getattr(channel, "_waitingForTransport", False))


def pending_method(channel: HTTPChannel) -> Optional[bytes]:
    """
    The method of the request whose head C{channel} is receiving (from its request line on, until
    the request is handed to the Request object), or None.
    """
    method = getattr(channel, "_command", None)
    return method if isinstance(method, bytes) else None


# -- Site access log ----------------------------------------------------------------------------------


def access_log_sink(site: Site) -> Optional[tuple[Callable[[str], Any], str, Any]]:
    """
    C{(write, timestamp, formatter)} of C{site}'s access log while it writes one (to its own file or
    into the twistd log): C{write} takes one line of text (newline included), C{timestamp} is the
    cached time stamp Twisted puts in the log lines of this second, C{formatter} the site's log
    formatter.  None when the site logs nowhere (or this Twisted keeps these elsewhere): use
    C{site.log} then.

    Newer Twisted keeps a text file in C{_logFile}; 23.10 keeps a binary file in C{logFile} and
    writes UTF-8 to it.
    """
    from twisted.python import log as legacy_log

    stamp = getattr(site, "_logDateTime", None)
    formatter = getattr(site, "_logFormatter", None)
    if not isinstance(stamp, str) or formatter is None:
        return None
    if hasattr(type(site), "_logFile"):  # newer Twisted: a text file, None while logging nowhere
        text_file = getattr(site, "_logFile", None)
        return (text_file.write, stamp, formatter) if text_file is not None else None
    log_file = getattr(site, "logFile", None)  # Twisted 23.10: absent while logging nowhere
    if log_file is None:
        return None
    if log_file is legacy_log.logfile:  # the twistd log takes text
        return log_file.write, stamp, formatter
    write = log_file.write  # a binary file of its own
    return (lambda line: write(line.encode("utf-8"))), stamp, formatter


def reopen_access_log(site: Site) -> None:
    """
    Close C{site}'s access-log file and open its C{logPath} again (logrotate moved the file: SIGUSR1);
    nothing while it logs into the twistd log or nowhere.  Newer Twisted keeps the file in
    C{_logFile}, 23.10 in C{logFile} (see L{access_log_sink}).
    """
    from twisted.python import log as legacy_log

    path = getattr(site, "logPath", None)
    if not path:
        return
    attribute = "_logFile" if hasattr(type(site), "_logFile") else "logFile"
    old = getattr(site, attribute, None)
    if old is None or old is legacy_log.logfile:
        return
    setattr(site, attribute, site._openLogFile(path))
    old.close()


# -- requests ------------------------------------------------------------------------------------------


def request_disconnected(request: Request) -> bool:
    """Whether C{request}'s connection was lost before it finished."""
    return bool(getattr(request, "_disconnected", False))


# -- TCP transports -----------------------------------------------------------------------------------


def tcp_transport(transport: Any) -> bool:
    """A plain (not TLS) TCP transport of Twisted's, open or not: one L{queued_bytes} can read."""
    return bool(
        isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", False)
        and not ISSLTransport.providedBy(transport)
    )


def plain_tcp(transport: Any) -> bool:
    """A live plain (not TLS) TCP connection, whose socket may be read and written directly."""
    return tcp_transport(transport) and bool(transport.connected and not transport.disconnecting)


def queued_bytes(transport: Any) -> int:
    """Bytes written to C{transport} (a L{tcp_transport}) that it has not yet handed to the kernel."""
    pending = len(transport.dataBuffer) - transport.offset
    for piece in transport._tempDataBuffer:
        pending += len(piece)
    return pending


def send_socket(transport: Any) -> Any:
    """The socket object of a L{plain_tcp} transport (for a direct C{send})."""
    return transport.socket


def socket_writable(transport: Any) -> bool:
    """Whether the kernel would take more bytes on C{transport}'s socket now (a connected L{tcp_transport})."""
    poller = select.poll()
    poller.register(transport.fileno(), select.POLLOUT)
    return bool(poller.poll(0))


def read_now(transport: Any) -> None:
    """Read what C{transport}'s socket holds now, as the reactor would on a readable event."""
    transport.doRead()


def flush_now(transport: Any) -> None:
    """Send what C{transport} buffered now, as the reactor would on a writable event."""
    transport.doWrite()


def want_writable(transport: Any) -> None:
    """Ask the reactor to call C{transport}'s producer on the next writable event."""
    transport.startWriting()


def transport_connected(transport: Any) -> bool:
    """Whether C{transport}'s connection is still up (it may be closing: see L{transport_open})."""
    return bool(getattr(transport, "connected", False))


def transport_open(transport: Any) -> bool:
    """Whether C{transport}'s connection is up and not closing: more bytes may still go out on it."""
    return bool(getattr(transport, "connected", False) and not getattr(transport, "disconnecting", False))


def transport_producer(transport: Any) -> tuple[Any, bool]:
    """C{(producer, streaming)}: what holds C{transport}'s producer slot now (None if nothing)."""
    producer = getattr(transport, "producer", None)
    return producer, producer is not None and bool(getattr(transport, "streamingProducer", False))


def close_now(transport: Any) -> None:
    """
    Close C{transport}'s connection and free its descriptor now, in this call, when it is a
    L{plain_tcp} one with nothing left to send (its protocol's C{connectionLost} runs before this
    returns); otherwise close it the usual way, once what it holds is sent.  (C{loseConnection} frees
    the descriptor only on a later reactor turn, too late when descriptors run out within one burst
    of accepts.)
    """
    if plain_tcp(transport) and not queued_bytes(transport):
        transport.connectionLost(Failure(ConnectionDone("closed to make room")))
    else:
        transport.loseConnection()


def set_read_size(transport: Any, size: int) -> None:
    """Let C{transport} read up to C{size} bytes per read call (Twisted's default is 64 KiB)."""
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = size


# -- the HTTP/1.1 client ----------------------------------------------------------------------------------


def _strict_protocol() -> Optional[type]:
    """The client protocol of L{strict_client_connections}, or None if this Twisted lacks what it uses."""
    try:
        from twisted.web._newclient import HTTP11ClientProtocol
        from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
    except ImportError:
        return None
    if not (hasattr(HTTP11ClientProtocol, "_finishResponse_WAITING") and hasattr(HTTPConnectionPool, "_factory")
            and hasattr(_HTTP11ClientFactory, "buildProtocol")):
        return None

    class OneAnswerPerRequest(HTTP11ClientProtocol):  # type: ignore[misc]
        body_read_size: Optional[int] = None  # see set_body_read_size

        def request(self, request: Any) -> Any:
            size = self.body_read_size
            if size is not None:
                set_read_size(self.transport, HEAD_READ_SIZE)
            d = super().request(request)
            parser = getattr(self, "_parser", None)

            def remember(response: Any) -> Any:
                if size is not None:
                    set_read_size(self.transport, size)  # the head is parsed: the body in large reads
                fields = getattr(parser, "connHeaders", None)
                if fields is not None:
                    response._h264edge_connection_fields = tuple(
                        (name.decode("latin-1"), value.decode("latin-1"))
                        for name, values in fields.getAllRawHeaders() for value in values)
                return response

            return d.addCallback(remember)

        def _finishResponse_WAITING(self, rest: bytes) -> None:
            request = getattr(self, "_currentRequest", None)
            if rest and request is not None:
                request.persistent = False  # the connection is given up instead of pooled
            super()._finishResponse_WAITING(rest)

        _finishResponse_TRANSMITTING = _finishResponse_WAITING

    class StrictConnections(_HTTP11ClientFactory):  # type: ignore[misc]
        def buildProtocol(self, addr: Any) -> Any:
            return OneAnswerPerRequest(self._quiescentCallback)

    return StrictConnections


_STRICT_CONNECTIONS = _strict_protocol()

#: bytes read per call while an answer's head is awaited (see L{set_body_read_size})
HEAD_READ_SIZE = 16 * 1024


def set_body_read_size(protocol: Any, size: int) -> None:
    """
    Let the connection of C{protocol} (a client protocol of L{strict_client_connections}) read an
    answer's body C{size} bytes per call, and its head L{HEAD_READ_SIZE} bytes per call.  Twisted's
    client parses the head line by line (C{LineReceiver}), copying all the bytes that follow a line
    once per line: with the first 256 KiB of a body in the same read, a 12-line head meant ~1.5 MB
    copied before the answer was seen (~0.1 ms on every origin answer).  Elsewhere the size is
    simply the read size (L{set_read_size}).
    """
    transport = getattr(protocol, "transport", None)
    if transport is not None:
        set_read_size(transport, size)
    if _STRICT_CONNECTIONS is not None and hasattr(protocol, "body_read_size"):
        protocol.body_read_size = size


def strict_client_connections(pool: Any) -> bool:
    """
    Make the connections of C{pool} (a twisted.web C{HTTPConnectionPool}) go back to it only if
    their answer ended where the bytes received ended, and let each answer tell the fields Twisted's
    parser keeps apart (L{answer_connection_fields}).  Twisted's client drops bytes that come after
    an answer's end in the same read and pools the connection: the rest of such bytes (a second,
    unasked answer) could be taken as the answer to the next request sent on it.  (Bytes arriving
    while a connection is idle in the pool close it: Twisted gives it up by itself.)

    False, and the pool unchanged, where this Twisted lacks the internals it uses (the pool's
    C{_factory}, the protocol's state-dispatched C{_finishResponse_WAITING}, its C{_currentRequest}
    and C{_parser.connHeaders}).
    """
    if _STRICT_CONNECTIONS is None:
        return False
    pool._factory = _STRICT_CONNECTIONS
    return True


def answer_connection_fields(response: Any) -> tuple[tuple[str, str], ...]:
    """
    The fields of an answer's head that Twisted's client keeps to itself (Connection, Keep-Alive,
    Content-Length, Transfer-Encoding, ...), for an answer on a L{strict_client_connections} pool;
    empty otherwise.
    """
    for _ in range(4):  # treq wraps a buffered answer twice
        fields = getattr(response, "_h264edge_connection_fields", None)
        if fields is not None:
            return tuple(fields)
        response = treq_raw_response(response)
    return ()


# -- treq -----------------------------------------------------------------------------------------------


def treq_raw_response(response: Any) -> Any:
    """The Twisted L{IResponse} under treq's response wrapper (or C{response} itself)."""
    return getattr(response, "original", response)
