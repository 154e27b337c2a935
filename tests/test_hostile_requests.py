"""
Hostile raw requests over a real socket: whatever a client sends, the edge answers 2xx-4xx (or closes
the connection), never a 5xx, never a traceback in its log, never more than a short excerpt of the
input in an error body.  The list is bounded; each exchange ends at the first whole answer, at the
server's close, or at a short deadline (the edge's own deadlines are set short too).
"""

from __future__ import annotations

import re
import socket
import time
from typing import Any, Optional

from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from h264edge.web.limits import ConnectionLimits
from tests.edgekit import EdgeTestCase, random_bytes

DIGITS = "9" * 5000


def request(target: str, *headers: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}", "Host: edge", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


HOSTILE: list[tuple[str, bytes]] = [
    # numbers
    ("range of 5000 digits", request("/a.bin", f"Range: bytes={DIGITS}-")),
    ("suffix range of 5000 digits", request("/a.bin", f"Range: bytes=-{DIGITS}")),
    ("range end of 5000 digits", request("/a.bin", f"Range: bytes=0-{DIGITS}")),
    ("range with superscript digits", request("/a.bin", "Range: bytes=\xb2-\xb3")),
    ("range of 2000 parts", request("/a.bin", "Range: bytes=" + ",".join(["0-0"] * 2000))),
    ("range in another unit", request("/a.bin", "Range: items=0-1")),
    ("range of bytes 0xff", request("/a.bin", "Range: bytes=\xff\xfe-")),
    ("flv start superscript two", request("/a.flv?start=%C2%B2")),
    ("flv start arabic one", request("/a.flv?start=%D9%A1")),
    ("flv start 5000 digits", request(f"/a.flv?start={DIGITS}")),
    ("flv start 20 digits", request("/a.flv?start=99999999999999999999")),
    ("flv start negative", request("/a.flv?start=-1")),
    ("mp4 start superscript two", request("/a.mp4?start=%C2%B2")),
    ("mp4 start underscore", request("/a.mp4?start=1_0")),
    ("mp4 start nan", request("/a.mp4?start=nan")),
    ("mp4 start inf", request("/a.mp4?start=inf")),
    ("mp4 start 1e999", request("/a.mp4?start=1e999")),
    ("mp4 start hex", request("/a.mp4?start=0x10")),
    ("mp4 start 5000 digits", request(f"/a.mp4?start={DIGITS}")),
    ("mp4 start fraction of 5000 digits", request(f"/a.mp4?start=1.{DIGITS}")),
    ("mp4 end 5000 digits", request(f"/a.mp4?end={DIGITS}")),
    ("mp4 start with spaces", request("/a.mp4?start=%201%20")),
    ("mp4 start 0xff", request("/a.mp4?start=%ff")),
    # conditionals
    ("if-modified-since of 5000 digits", request("/a.bin", f"If-Modified-Since: {DIGITS}")),
    ("if-modified-since year 99999", request("/a.bin", "If-Modified-Since: Sun, 06 Nov 99999 08:49:37 GMT")),
    ("if-modified-since day 99", request("/a.bin", "If-Modified-Since: Sun, 99 Nov 1994 08:49:37 GMT")),
    ("if-modified-since of latin-1", request("/a.bin", "If-Modified-Since: \xb2\xb2\xb2 \xff")),
    ("if-none-match of 8000 bytes", request("/a.bin", "If-None-Match: " + '"x",' * 2000)),
    ("if-range junk", request("/a.bin", "Range: bytes=0-1", "If-Range: \xff\x80 W/")),
    # framing
    ("content-length of 5000 digits", request("/a.bin", f"Content-Length: {DIGITS}")),
    ("content-length negative", request("/a.bin", "Content-Length: -1")),
    ("content-length with a plus", request("/a.bin", "Content-Length: +1")),
    ("two content-lengths", request("/a.bin", "Content-Length: 1", "Content-Length: 2") + b"xy"),
    ("content-length and chunked", request("/a.bin", "Content-Length: 3", "Transfer-Encoding: chunked")
     + b"0\r\n\r\n"),
    ("chunk size of 5000 hex digits", request("/a.bin", "Transfer-Encoding: chunked") + b"f" * 5000 + b"\r\n"),
    ("chunk size not hex", request("/a.bin", "Transfer-Encoding: chunked") + b"zz\r\nab\r\n0\r\n\r\n"),
    ("transfer-encoding gzip", request("/a.bin", "Transfer-Encoding: gzip")),
    ("body never sent", request("/a.bin", "Content-Length: 100")),
    ("expect 100-continue", request("/a.bin", "Expect: 100-continue", "Content-Length: 5") + b"hello"),
    # targets
    ("path 0xff", request("/%ff.bin")),
    ("path raw 0xff", request("/\xff.bin")),
    ("path traversal", request("/..%2f..%2fetc/passwd")),
    ("path dot segments", request("/a/./../a.bin")),
    ("path NUL", request("/a%00.bin")),
    ("path backslash", request("/a%5c..%5cb.bin")),
    ("path of 12000 bytes", request("/" + "a" * 12000 + ".bin")),
    ("query of junk", request("/a.bin?%ff=%fe&&=&%&%zz=%")),
    ("query raw bytes", request("/a.bin?x=\xff\x80\x01")),
    ("absolute target", request("http://evil.example/a.bin")),
    ("asterisk target", request("*")),
    ("directory", request("/")),
    ("purge of 0xff", request("/%ff", method="PURGE")),
    ("purge with raw bytes", request("/a.bin?start=\xff", method="PURGE")),
    ("options asterisk", request("*", method="OPTIONS")),
    ("connect", request("evil.example:443", method="CONNECT")),
    ("method with a control byte", request("/a.bin", method="G\x01T")),
    ("method of 200 letters", request("/a.bin", method="X" * 200)),
    ("method of latin-1", request("/a.bin", method="G\xc9T")),
    # heads
    ("http version 9.9", request("/a.bin", version="HTTP/9.9")),
    ("http version junk", request("/a.bin", version="\xff\xfe")),
    ("no version", b"GET /a.bin\r\n\r\n"),
    ("header without colon", request("/a.bin", "NoColonHere")),
    ("header name with a space", request("/a.bin", "Bad Name: x")),
    ("folded header", request("/a.bin", "X-A: a", " folded")),
    ("LF line endings", b"GET /a.bin HTTP/1.1\nHost: edge\n\n"),
    ("600 headers", request("/a.bin", *[f"X-{n}: {n}" for n in range(600)])),
    ("header of 20000 bytes", request("/a.bin", "X-Big: " + "b" * 20000)),
    ("request line of 20000 bytes", request("/" + "a" * 20000)),
    ("NUL in a header", request("/a.bin", "X-A: a\x00b")),
    ("host of 0xff", b"GET /a.bin HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n"),
    ("bare CRs", b"GET /a.bin HTTP/1.1\rHost: edge\r\r"),
    ("empty lines then junk", b"\r\n\r\n\r\n\xff\xfe\xfd\r\n\r\n"),
    ("binary junk", bytes(range(256)) * 4),
    ("incomplete head", b"GET /a.bin HTTP/1.1\r\nHost: edge\r\n"),
]


def exchange(port: int, raw: bytes, deadline: float = 4.0) -> tuple[Optional[int], bytes]:
    """Send C{raw}; the first answer's status and body (None: closed without an answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=deadline)
    data = b""
    try:
        try:
            sock.sendall(raw)
        except OSError:
            pass
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = re.search(rb"\r\ncontent-length: *([0-9]+)", head, re.IGNORECASE)
                if length is not None and len(rest) >= int(length.group(1)):
                    break
            sock.settimeout(max(end - time.monotonic(), 0.01))
            try:
                piece = sock.recv(65536)
            except OSError:
                break
            if not piece:
                break
            data += piece
    finally:
        sock.close()
    while data.startswith(b"HTTP/1.1 100 "):
        data = data.partition(b"\r\n\r\n")[2]
    match = re.match(rb"HTTP/1\.[01] ([0-9]{3})", data)
    return (int(match.group(1)) if match else None), data.partition(b"\r\n\r\n")[2]


class HostileRequestTests(EdgeTestCase):
    site_options = {"limits": ConnectionLimits(header_timeout=1, idle_timeout=1, send_timeout=1)}

    def setUp(self) -> None:
        super().setUp()
        for name in ("/a.bin", "/a.flv", "/a.mp4"):
            self.origin.add(name, random_bytes(3000, seed=len(name)))
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def test_no_hostile_request_gets_a_5xx_or_a_traceback(self) -> None:
        port = int(self.edge_port.getHost().port)
        answers = {}
        for name, raw in HOSTILE:
            answers[name] = await deferToThread(exchange, port, raw)
        server_errors = {name: (status, body[:100]) for name, (status, body) in answers.items()
                         if status is not None and status >= 500}
        self.assertEqual(server_errors, {})
        failures = [formatEvent(event) for event in self.events
                    if event.get("log_failure") is not None or event.get("isError")]
        self.assertEqual(failures, [])
        logged = "\n".join(formatEvent(event) for event in self.events)
        self.assertNotIn("Traceback", logged)
        for name, (status, body) in answers.items():
            if status is not None and status >= 400:
                self.assertLess(len(body), 300, name)  # a short excerpt of the input at most
                self.assertNotIn(b"9" * 50, body, name)
        # the two cases the issue names, precisely
        self.assertEqual(answers["range of 5000 digits"][0], 416)
        self.assertEqual(answers["flv start superscript two"][0], 400)
        self.assertEqual(answers["mp4 start superscript two"][0], 400)
        self.assertEqual(answers["content-length of 5000 digits"][0], 413)
        self.assertEqual(answers["header of 20000 bytes"][0], 431)
        self.assertEqual(answers["incomplete head"][0], 408)
