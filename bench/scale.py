#!/usr/bin/env python3
"""
Scaling-out figures (README "Scaling out"): the same origin workload through

  1. one edge, one process;          2. one edge, --workers=2;
  3. one edge behind HAProxy;        4. three edges behind HAProxy (contrib/haproxy.cfg)

each against a fresh static origin (twisted web, whose access log counts the bytes it sent), each edge
with the same --max-size, smaller than the working set: one edge keeps part of it, three edges
between them keep all of it.  Prints origin requests and bytes, the hit ratio (X-Cache of every
answer) and requests/s.  Small by default (a minute or two on 2 cores); all on 127.0.0.1.

    .venv/bin/python bench/scale.py [--files 24] [--requests 1200] [--clients 16] [--setups 1,2,3,4]

1 vs 2 worker processes alone: --setups 1,2.  (Hit throughput with one and two processes, where
the CPU is the limit, is figure 4 of bench/run.py: bench/run.py --only small.)
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.engines import ChildServer, EdgeServer, HAProxy, free_port  # noqa: E402

_ORIGIN_LINE = re.compile(r'"GET \S+ HTTP/1\.1" (\d{3}) (\d+)')


class StaticOrigin(ChildServer):
    name = "origin"

    def __init__(self, workdir: str, files: str) -> None:
        super().__init__(workdir)
        self.files = files
        self.port = free_port()

    def start(self) -> "StaticOrigin":
        self.spawn([sys.executable, "-m", "twisted", "--log-format=text", "web", "--path", self.files,
                    "--listen", f"tcp:{self.port}:interface=127.0.0.1"])
        self.wait_listening(self.port)
        return self

    def sent(self) -> tuple[int, int]:
        """(requests, body bytes) from its access log lines."""
        requests = sent = 0
        for match in _ORIGIN_LINE.finditer(self.output()):
            requests += 1
            sent += int(match.group(2))
        return requests, sent


def workload(files: list[str], requests: int, seed: int = 7) -> list[tuple[str, str | None]]:
    """Zipf-like popularity over the files; a third of the requests are ranges (a player's seek)."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(files))]
    out = []
    for name in rng.choices(files, weights, k=requests):
        if rng.random() < 0.33:
            first = rng.randrange(0, 2**21 - 65536)
            out.append((name, f"bytes={first}-{first + 65535}"))
        else:
            out.append((name, None))
    return out


def run_clients(port: int, work: list[tuple[str, str | None]], clients: int) -> tuple[int, int, float]:
    """(answers, hits, seconds) for the workload spread over C{clients} keep-alive connections."""
    hits = answers = 0
    lock = threading.Lock()
    items = list(enumerate(work))

    def client(number: int) -> None:
        nonlocal hits, answers
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i, (name, rng) in items[number::clients]:
            headers = {"Range": rng} if rng else {}
            try:
                conn.request("GET", "/" + name, headers=headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            with lock:
                answers += 1
                hits += response.getheader("X-Cache") == "HIT"
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, hits, time.monotonic() - start


def scenario(name: str, base: str, media: str, work: list[Any], clients: int, edges: int, workers: int,
             proxy: bool, max_size: str) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix=name.replace(" ", "-") + "-", dir=base)
    origin = StaticOrigin(os.path.join(root, "origin"), media).start()
    servers: list[ChildServer] = [origin]
    try:
        extra = ["--no-sync", f"--max-size={max_size}", "--slice-size=256K"]
        if workers > 1:
            extra.append(f"--workers={workers}")
        fleet = [EdgeServer(os.path.join(root, f"edge{i}"), f"edge{i}", f"http://127.0.0.1:{origin.port}/",
                            *extra).start() for i in range(edges)]
        servers += fleet
        port = fleet[0].port
        if proxy:
            haproxy = HAProxy(os.path.join(root, "haproxy"), [e.checked for e in fleet]).start()
            servers.append(haproxy)
            port = haproxy.port
        time.sleep(1.0)  # workers and health checks settle
        answers, hits, seconds = run_clients(port, work, clients)
        requests, sent = origin.sent()
        return {"name": name, "answers": answers, "hit_ratio": hits / max(answers, 1),
                "origin_requests": requests, "origin_mib": sent / 2**20, "rps": answers / seconds}
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


#: name, edges, worker processes per edge, behind HAProxy
SETUPS = [("1 edge, 1 process", 1, 1, False), ("1 edge, --workers=2", 1, 2, False),
          ("1 edge behind HAProxy", 1, 1, True), ("3 edges behind HAProxy", 3, 1, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-size", default="20M", help="each edge's --max-size (the working set is 2 MiB per file)")
    parser.add_argument("--setups", default="1,2,3,4", help="which setups to run, by number (see above)")
    args = parser.parse_args()
    numbers = [n.strip() for n in args.setups.split(",") if n.strip()]
    if not numbers or any(n not in {"1", "2", "3", "4"} for n in numbers):
        parser.error(f"--setups takes numbers 1-4, comma separated, not {args.setups!r}")
    setups = [SETUPS[int(n) - 1] for n in numbers]
    base = tempfile.mkdtemp(prefix="h264edge-scale-")
    try:
        media = os.path.join(base, "media")
        os.makedirs(media)
        rng = random.Random(1)
        names = [f"v{i}.bin" for i in range(args.files)]
        for name in names:
            with open(os.path.join(media, name), "wb") as f:
                f.write(rng.randbytes(2**21))
        work = workload(names, args.requests)
        print(f"{args.requests} requests ({args.clients} clients) over {args.files} files of 2 MiB "
              f"({args.files * 2} MiB working set), each edge --max-size={args.max_size}")
        print(f"{'setup':<28} {'hit ratio':>9} {'origin reqs':>11} {'origin MiB':>10} {'req/s':>7}")
        for name, edges, workers, proxy in setups:
            r = scenario(name, base, media, work, args.clients, edges, workers, proxy, args.max_size)
            print(f"{r['name']:<28} {r['hit_ratio']:>9.2f} {r['origin_requests']:>11} {r['origin_mib']:>10.1f} "
                  f"{r['rps']:>7.0f}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
