"""
Load clients: raw-socket HTTP/1.1 GETs timed to the first byte and to the end, wrk runs, slow viewers.

Bodies are discarded.  By default they are copied to user space first, as every real client (curl,
a player) does; with L{DISCARD_IN_KERNEL} set, recv uses MSG_TRUNC and TCP drops the bytes without
copying them, which halves the client's CPU but, on loopback, moves part of the receive-side TCP work
into the sender's accounting (measured: nginx's CPU per GiB rose from ~0.1-0.17 to ~0.24-0.33).

Every loop here is bounded: socket timeouts, request counts and overall deadlines.
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import subprocess
import threading
import time
from typing import Callable, Optional

from dataclasses import dataclass

MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0x20)
CHUNK = 1 << 20
DISCARD_IN_KERNEL = False


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict
    length: int  # body bytes received
    ttfb: float  # seconds from connect to the first byte of the answer
    total: float  # seconds from connect to the last byte


def get(port: int, path: str, save: Optional[str] = None, timeout: float = 60.0,
        host: str = "127.0.0.1") -> Answer:
    """One GET on a new connection (Connection: close); the body is discarded unless C{save} names a file."""
    t0 = time.perf_counter()
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        ttfb = 0.0
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not ttfb:
                ttfb = time.perf_counter() - t0
            if not data:
                raise ConnectionError(f"connection closed in the headers of {path}")
            head += data
            if len(head) > 1 << 20:
                raise ConnectionError("headers too long")
        raw, _, body_start = head.partition(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        expected = int(headers["content-length"]) if "content-length" in headers else None
        out = open(save, "wb") if save else None
        try:
            received = len(body_start)
            if out:
                out.write(body_start)
            buf = bytearray(CHUNK)
            flags = MSG_TRUNC if DISCARD_IN_KERNEL and not out else 0
            deadline = time.monotonic() + timeout
            while expected is None or received < expected:
                want = CHUNK if expected is None else min(CHUNK, expected - received)
                if out:
                    n = sock.recv_into(buf, want)
                    out.write(memoryview(buf)[:n])
                else:
                    n = sock.recv_into(buf, want, flags)
                if n == 0:
                    break
                received += n
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: body not done after {timeout} s")
        finally:
            if out:
                out.close()
        total = time.perf_counter() - t0
        if expected is not None and received != expected:
            raise ConnectionError(f"{path}: {received} of {expected} body bytes")
        return Answer(status, headers, received, ttfb, total)
    finally:
        sock.close()


def parallel_get(port: int, path: str, connections: int, timeout: float = 300.0) -> tuple[float, int]:
    """C{connections} simultaneous whole-body GETs; (wall seconds, total body bytes)."""
    results: list = [None] * connections
    barrier = threading.Barrier(connections + 1)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = get(port, path, timeout=timeout)
        except Exception as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(connections)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout + 5)
    wall = time.perf_counter() - t0
    errors = [r for r in results if not isinstance(r, Answer)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {connections} GETs failed: {errors[0]!r}")
    bad = [r.status for r in results if r.status != 200]
    if bad:
        raise RuntimeError(f"status {bad[0]} for {path}")
    return wall, sum(r.length for r in results)


# -- wrk -----------------------------------------------------------------------------------------

WRK_RANDOM_SEEK = """\
-- random short clips: start=S&end=S+{span} with S uniform in [0, {max_start}]
local counter = 0
function setup(thread)
    counter = counter + 1
    thread:set("seed", counter)
end
function init(args)
    math.randomseed(seed * 7919 + os.time())
end
function request()
    local s = math.random(0, {max_start})
    return wrk.format("GET", "{path}?start=" .. s .. "&end=" .. (s + {span}))
end
"""


def wrk(port: int, path: str, connections: int, seconds: float, threads: int = 1,
        script: Optional[str] = None) -> dict:
    """Run wrk; requests/s, and the counts of errors and non-2xx answers (a figure is void if any)."""
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s"]
    if script:
        cmd += ["-s", script]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    requests = re.search(r"(\d+) requests in", out)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": int(requests.group(1)) if requests else 0,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "errors": sum(int(x) for x in errors.groups()) if errors else 0,
        "output": out,
    }


# -- slow viewers --------------------------------------------------------------------------------

def slow_viewers(port: int, path: str, count: int, seconds: float, rate: int = 1024,
                 sample: Optional[Callable[[], int]] = None) -> dict:
    """
    C{count} connections that each GET C{path} and read C{rate} bytes a second for C{seconds},
    then close.  C{sample()} (the server's RSS) is called every second; the peak is returned.
    """
    sel = selectors.DefaultSelector()
    socks = []
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    peak = sample() if sample else 0
    failed = 0
    try:
        for i in range(count):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(request)
            except OSError:
                failed += 1
                s.close()
                continue
            s.setblocking(False)
            socks.append(s)
            if i % 50 == 49:
                time.sleep(0.02)  # let the server accept: listen backlogs differ
        received = [0] * len(socks)
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            tick = time.monotonic()
            for i, s in enumerate(socks):
                try:
                    data = s.recv(rate)
                    received[i] += len(data)
                except BlockingIOError:
                    pass
                except OSError:
                    pass
            if sample:
                peak = max(peak, sample())
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        served = sum(1 for r in received if r > 0)
    finally:
        for s in socks:
            s.close()
        sel.close()
    return {"peak_rss": peak, "connected": len(socks), "served": served, "failed": failed}
