"""L{h264edge.tcpio}: bytes written to a plain TCP transport leave at once, and never out of order."""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from h264edge.tcpio import queued, write_at_once


class WriteAtOnceTests(TestCase):
    timeout = 60
    async def connected(self) -> tuple[Protocol, socket.socket]:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        self.addCleanup(server.close)
        protocol = Protocol()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.getsockname()[1])
        await connectProtocol(endpoint, protocol)
        peer, _ = server.accept()
        self.addCleanup(peer.close)
        self.addCleanup(lambda: protocol.transport.loseConnection() if protocol.transport else None)
        return protocol, peer

    async def test_a_request_leaves_when_written(self) -> None:
        protocol, peer = await self.connected()
        write_at_once(protocol.transport)
        protocol.transport.writeSequence([b"GET / HTTP/1.1\r\n", b"Host: o\r\n\r\n"])  # type: ignore[union-attr]
        peer.setblocking(False)
        # no reactor turn in between: the bytes are already in the peer's socket
        self.assertEqual(peer.recv(100), b"GET / HTTP/1.1\r\nHost: o\r\n\r\n")

    async def test_what_the_socket_does_not_take_keeps_its_order(self) -> None:
        protocol, peer = await self.connected()
        transport = protocol.transport
        assert transport is not None
        # small buffers: the socket cannot take the big write at once, so the rest must queue
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # type: ignore[attr-defined]
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        write_at_once(transport)
        big = bytes(range(256)) * (8 * 1024)  # 2 MiB
        transport.write(big)
        self.assertTrue(queued(transport))
        transport.writeSequence([b"after", b"-the-rest"])  # queued behind big's remainder, not sent first
        transport.write(b"!")
        expected = big + b"after-the-rest!"

        def read_all() -> bytes:
            peer.settimeout(30)
            chunks, got = [], 0
            while got < len(expected):
                data = peer.recv(1 << 20)
                if not data:
                    break
                chunks.append(data)
                got += len(data)
            return b"".join(chunks)

        received = await deferToThread(read_all)
        self.assertEqual(len(received), len(expected))
        self.assertTrue(received == expected, "bytes out of order")
