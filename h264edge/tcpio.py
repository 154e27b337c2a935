# -*- test-case-name: tests.test_sendfile,tests.test_hot,tests.test_edge -*-
"""
Writing to plain TCP transports without waiting for the reactor's next turn.

Twisted's C{transport.write} only buffers: the bytes leave on the next writable event, after the
current call chain unwinds and the reactor polls again (~0.1-0.2 ms on this kind of machine).  Where
that turn is on the way to a viewer's first byte (a hot answer, the headers of a miss, the request
to the origin) the bytes are sent at once instead, when nothing is queued before them, so order is
kept; what the socket does not take goes to the transport as usual.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from h264edge._twisted_compat import plain_tcp, queued_bytes, send_socket

__all__ = ["plain_tcp", "queued", "send_now", "write_at_once"]


def queued(transport: Any) -> bool:
    """Whether C{transport} (a L{plain_tcp} one) still holds bytes written earlier."""
    return queued_bytes(transport) > 0


def send_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending what the socket takes right away when nothing is queued
    before it: one C{send} instead of Twisted's register-for-writable, wait, send, unregister (a
    third of the cost of a small answer).  Any other case, and the rest, goes to C{transport.write}.
    """
    _send(transport, data, transport.write)


def _send(transport: Any, data: bytes, write: Callable[[bytes], None]) -> None:
    if plain_tcp(transport) and not queued(transport):
        try:
            sent = send_socket(transport).send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # let the transport meet the error and close the connection its own way
        if sent == len(data):
            return
        data = data[sent:]
    write(data)


def write_at_once(transport: Any) -> None:
    """
    From now on, C{transport}'s C{write} and C{writeSequence} send at once (as L{send_now}) when
    nothing is queued.  For connections we make ourselves (to origins): their protocol writes a
    request in one call and then waits for the answer.
    """
    if not plain_tcp(transport):
        return
    buffered = transport.write  # the transport's own, which queues

    def write(data: bytes) -> None:
        _send(transport, data, buffered)

    def write_sequence(data: Iterable[bytes]) -> None:
        _send(transport, b"".join(data), buffered)

    transport.write = write
    transport.writeSequence = write_sequence
