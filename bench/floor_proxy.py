"""
The floor of figure 5a: the least a twisted.web + treq edge can do on a cold miss.  It passes a GET
through to the origin with one pooled keep-alive connection (opened at start, as the edge's probe
does) and streams the answer back: no cache, no checks, no headers but the length.  Whatever the
edge does beyond this is the edge's own cost; what this costs is Twisted's and treq's.

    python bench/floor_proxy.py PORT ORIGIN_URL
"""

import sys

import treq
from twisted.internet import protocol, reactor
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool


class _Copy(protocol.Protocol):
    def __init__(self, request: server.Request) -> None:
        self.request = request

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: object = None) -> None:
        self.request.finish()


class FloorProxy(resource.Resource):
    isLeaf = True

    def __init__(self, origin: str, client: treq.client.HTTPClient) -> None:
        super().__init__()
        self.origin = origin.rstrip("/")
        self.client = client

    def render_GET(self, request: server.Request) -> object:
        d = self.client.request("GET", self.origin + request.uri.decode("ascii"), unbuffered=True,
                                allow_redirects=False, headers={"Range": "bytes=0-"})

        def answer(response: object) -> None:
            request.setHeader(b"Content-Length", str(response.length).encode())  # type: ignore[attr-defined]
            request.setHeader(b"X-Cache", b"MISS")
            request.write(b"")
            response.deliverBody(_Copy(request))  # type: ignore[attr-defined]

        d.addCallback(answer)
        return server.NOT_DONE_YET


def main() -> None:
    port, origin = int(sys.argv[1]), sys.argv[2]
    client = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True)))
    reactor.callWhenRunning(lambda: client.request("HEAD", origin).addCallback(treq.content))
    reactor.listenTCP(port, server.Site(FloorProxy(origin, client)), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
