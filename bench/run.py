#!/usr/bin/env python3
"""
h264edge vs nginx, side by side on this machine: one command starts every server on 127.0.0.1, runs
the figures of issue 4, prints a table and writes bench/RESULTS.md.  See bench/README.md.

    .venv/bin/python bench/run.py              # full run (~10 minutes once media exist)
    .venv/bin/python bench/run.py --quick      # smoke: tiny media, 1 run each, < 2 minutes
    .venv/bin/python bench/run.py --only hit,small --runs 5
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import clients  # noqa: E402
import media  # noqa: E402
import servers  # noqa: E402

MB = 1e6
GIB = 1 << 30


# -- rows -----------------------------------------------------------------------------------------

@dataclass
class Row:
    """One figure line: samples per server, and a target on the ratio h264edge/nginx or on h264edge alone."""

    key: str
    title: str
    unit: str
    nginx: list = field(default_factory=list)
    edge: list = field(default_factory=list)
    target: Optional[tuple] = None  # ("ratio>=", x) | ("ratio<=", x) | ("edge<=", x) | ("edge==", x)
    note: str = ""
    error: str = ""

    @staticmethod
    def _stat(values: list) -> Optional[tuple]:
        if not values:
            return None
        return statistics.median(values), min(values), max(values)

    def ratio(self) -> Optional[float]:
        n, e = self._stat(self.nginx), self._stat(self.edge)
        if not n or not e or n[0] == 0:
            return None
        return e[0] / n[0]

    def verdict(self) -> str:
        if self.error:
            return "error"
        if not self.target:
            return "-"
        kind, bound = self.target
        e = self._stat(self.edge)
        value = self.ratio() if kind.startswith("ratio") else (e[0] if e else None)
        if value is None:
            return "n/a"
        ok = value >= bound if kind.endswith(">=") else value <= bound if kind.endswith("<=") else value == bound
        return "PASS" if ok else "FAIL"

    def target_text(self) -> str:
        if not self.target:
            return "(info)"
        kind, bound = self.target
        if kind.startswith("ratio"):
            return f"ratio {kind[5:]} {bound:g}"
        return f"h264edge {kind[4:]} {bound:g} {self.unit}"


def fmt(stat: Optional[tuple]) -> str:
    if stat is None:
        return "n/a"
    med, lo, hi = stat

    def f(x: float) -> str:
        return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"

    return f(med) if lo == hi else f"{f(med)} [{f(lo)}-{f(hi)}]"


# -- context --------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.runs = args.runs or (1 if args.quick else 5)
        self.tmp = tempfile.mkdtemp(prefix="h264edge-bench-")
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.media: media.MediaSet
        self.origin: Optional[servers.OriginNginx] = None
        self.direct: Optional[servers.DirectNginx] = None
        self.edge: Optional[servers.Edge] = None
        self.warmed: set[str] = set()
        self.edge_extra = args.edge_arg or []

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def row(self, *args, **kwargs) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row

    def dir(self, name: str) -> str:
        path = os.path.join(self.tmp, name)
        os.makedirs(path, exist_ok=True)
        return path

    def start_shared(self) -> None:
        self.origin = servers.OriginNginx(self.dir("origin"), self.media.root).start()
        self.direct = servers.DirectNginx(self.dir("nginx"), self.media.root).start()
        self.edge = self.new_edge("edge", profile=self.args.profile_edge)
        self.log(f"origin nginx :{self.origin.ports}, nginx :{self.direct.port}, h264edge :{self.edge.port}")

    def ensure_up(self) -> None:
        """Restart a shared server that died (something outside the harness killed it); say so."""
        for attr in ("origin", "direct", "edge"):
            server = getattr(self, attr)
            if server is not None and not server.alive():
                code = server.proc.returncode if server.proc is not None else None
                self.notes.append(f"{server.name} (shared) had exited (status {code}) at "
                                  f"{time.strftime('%H:%M:%S')}, killed from outside the harness; restarted")
                self.log(f"{server.name} died (status {code}); restarting")
                server.stop()
                server.start()  # same ports and (for the edge) the same cache dir
                if attr == "edge":
                    self.warmed.clear()

    def origin_url(self) -> str:
        return f"http://127.0.0.1:{self.origin.ports['plain']}/"

    def new_edge(self, name: str, extra: Optional[list] = None, profile: str = "") -> servers.Edge:
        edge = servers.Edge(self.dir(name), self.origin_url(), self.edge_extra + (extra or []))
        if profile:
            edge.twistd_options = [f"--profile={os.path.abspath(profile)}", "--profiler=cprofile", "--savestats"]
        edge.wipe()
        return edge.start()

    def warm(self, path: str) -> None:
        """Fetch C{path} whole through the shared edge until it answers as a hit (bounded)."""
        if path in self.warmed:
            return
        for _ in range(5):
            answer = clients.get(self.edge.port, path, timeout=300)
            if answer.headers.get("x-cache", "").upper().startswith("HIT"):
                break
            time.sleep(0.5)
        else:
            self.notes.append(f"{path} never answered X-Cache: HIT from h264edge (last: "
                              f"{answer.headers.get('x-cache')!r}); figures for it may include fills")
        clients.get(self.direct.port, path, timeout=300)  # page cache for nginx too
        self.warmed.add(path)

    def name(self, path: str) -> str:
        return "/" + os.path.basename(path)


# -- figures --------------------------------------------------------------------------------------

def fig_hit(b: Bench) -> None:
    """1. whole-file hit throughput of the ~1 GiB MP4, 1 and 8 connections; server CPU per GiB."""
    path = b.name(b.media.big)
    b.warm(path)
    size = os.path.getsize(b.media.big)
    rows = {
        (1, "mbps"): b.row("1a", f"hit throughput, {size / GIB:.2f} GiB MP4, 1 connection", "MB/s",
                           target=("ratio>=", 1.0)),
        (8, "mbps"): b.row("1b", "hit throughput, 8 connections", "MB/s", target=("ratio>=", 1.0)),
        (1, "cpu"): b.row("1c", "server CPU per GiB served, 1 connection", "CPU-s/GiB",
                          target=("ratio<=", 1.5)),
        (8, "cpu"): b.row("1d", "server CPU per GiB served, 8 connections", "CPU-s/GiB",
                          target=("ratio<=", 1.5)),
    }
    other = "copying" if clients.DISCARD_IN_KERNEL else "MSG_TRUNC"
    rows[(-8, "mbps")] = b.row("1e", f"hit throughput, 8 connections, {other} client", "MB/s")
    rows[(-8, "cpu")] = b.row("1f", f"server CPU per GiB served, 8 connections, {other} client", "CPU-s/GiB")
    client_cpu: dict = {1: [], 8: [], -8: []}
    default_mode = clients.DISCARD_IN_KERNEL
    try:
        for run in range(b.runs):
            for server, side in ((b.direct, "nginx"), (b.edge, "edge")):
                for conns in (1, 8, -8):
                    clients.DISCARD_IN_KERNEL = default_mode if conns > 0 else not default_mode
                    cpu0, me0 = server.cpu_seconds(), sum(os.times()[:2])
                    wall, nbytes = clients.parallel_get(server.port, path, abs(conns))
                    cpu1, me1 = server.cpu_seconds(), sum(os.times()[:2])
                    getattr(rows[(conns, "mbps")], side).append(nbytes / wall / MB)
                    getattr(rows[(conns, "cpu")], side).append((cpu1 - cpu0) / (nbytes / GIB))
                    client_cpu[conns].append((me1 - me0) / (nbytes / GIB))
                    label = f"{abs(conns)} conn" + (f" ({other} client)" if conns < 0 else "")
                    b.log(f"  hit {side:5} {label}: {nbytes / wall / MB:,.0f} MB/s, "
                          f"{(cpu1 - cpu0) / (nbytes / GIB):.3f} server CPU-s/GiB")
    finally:
        clients.DISCARD_IN_KERNEL = default_mode
    how = ("recv(MSG_TRUNC): bodies dropped in the kernel" if clients.DISCARD_IN_KERNEL
           else "recv_into a 1 MiB buffer, bodies copied then dropped, like curl")
    b.notes.append(f"1: the client ({how}; one thread per connection) used a median "
                   f"{statistics.median(client_cpu[1]):.3f} (1 conn) / {statistics.median(client_cpu[8]):.3f} "
                   f"(8 conns) CPU-s/GiB itself, in the same 2 cores; rows 1e/1f repeat 8 connections with "
                   f"the {other} client ({statistics.median(client_cpu[-8]):.3f} CPU-s/GiB). On loopback the "
                   f"receive-side TCP work is split between client and server accounting differently in the "
                   f"two modes.")


def fig_seek_ttfb(b: Bench) -> None:
    """2. TTFB of ?start=3600 into the two-hour clip, warm, median of >= 20."""
    start = 3600 if b.media.long_seconds >= 7200 else b.media.long_seconds // 2
    path = f"{b.name(b.media.long)}?start={start}"
    b.warm(b.name(b.media.long))
    count = 3 if b.quick else max(20, 10 * b.runs)
    row = b.row("2", f"seek TTFB, ?start={start} into the {b.media.long_seconds // 60}-min clip, warm "
                     f"(all {count} samples)", "ms", target=("ratio<=", 0.5))
    sizes = {}
    for side, server in (("nginx", b.direct), ("edge", b.edge)):
        for _ in range(2):
            clients.get(server.port, path)  # warm: index parsed, pages cached
    for _ in range(count):
        for side, server in (("nginx", b.direct), ("edge", b.edge)):
            answer = clients.get(server.port, path)
            if answer.status != 200:
                raise RuntimeError(f"{side}: status {answer.status} for {path}")
            getattr(row, side).append(answer.ttfb * 1000)
            sizes[side] = answer.length
    row.note = f"answer bytes: nginx {sizes['nginx']:,}, h264edge {sizes['edge']:,}"


def _wrk_rows(b: Bench, row: Row, port_of: dict, path: str, connections: int, script: Optional[str]) -> None:
    seconds = 1 if b.quick else b.args.wrk_seconds
    for run in range(b.runs):
        for side in ("nginx", "edge"):
            result = clients.wrk(port_of[side], path, connections, seconds, script=script)
            if result["non2xx"] or result["errors"] or not result["requests"]:
                row.note += (f" {side}: {result['non2xx']} non-2xx, {result['errors']} socket errors "
                             f"of {result['requests']};")
                if not result["requests"]:
                    raise RuntimeError(f"wrk made no requests to {side}: {result['output'][-500:]}")
            getattr(row, side).append(result["rps"])
            b.log(f"  {row.key} {side:5}: {result['rps']:,.0f} req/s")


def fig_seek_rps(b: Bench) -> None:
    """3. random short clips start=S&end=S+2 with wrk, 8 connections."""
    ports = {"nginx": b.direct.port, "edge": b.edge.port}
    for key, clip, seconds in (("3a", b.media.long, b.media.long_seconds),
                               ("3b", b.media.big, b.media.big_seconds)):
        path = b.name(clip)
        b.warm(path)
        script = os.path.join(b.tmp, f"seek_{key}.lua")
        with open(script, "w") as f:
            f.write(clients.WRK_RANDOM_SEEK.format(path=path, max_start=max(seconds - 3, 0), span=2))
        row = b.row(key, f"seek req/s, start=S&end=S+2 random S, {os.path.basename(clip)}, wrk 8 conns",
                    "req/s", target=("ratio>=", 0.5))
        try:
            _wrk_rows(b, row, ports, path, 8, script)
        except Exception as e:
            row.error = str(e)


def fig_small(b: Bench) -> None:
    """4. 16 KiB object hits, wrk 16 connections (1 wrk thread)."""
    path = b.name(b.media.small)
    b.warm(path)
    row = b.row("4", "16 KiB hit req/s, wrk 1 thread 16 conns, 1 server process each", "req/s",
                target=("ratio>=", 0.4))
    _wrk_rows(b, row, {"nginx": b.direct.port, "edge": b.edge.port}, path, 16, None)
    flag = edge_workers_flag(b)
    if not flag:
        b.notes.append("4: h264edge has no worker-process option yet (none in `twistd h264edge --help`), "
                       "so the 2-process row is not measured.")
        return
    nginx2 = servers.DirectNginx(b.dir("nginx2"), b.media.root, workers=2).start()
    edge2 = b.new_edge("edge2", [f"{flag}=2"])
    try:
        clients.get(edge2.port, path)
        clients.get(edge2.port, path)
        row2 = b.row("4b", "16 KiB hit req/s, 2 server processes each", "req/s", target=("ratio>=", 0.4))
        _wrk_rows(b, row2, {"nginx": nginx2.port, "edge": edge2.port}, path, 16, None)
    finally:
        edge2.stop()
        nginx2.stop()


def edge_workers_flag(b: Bench) -> Optional[str]:
    out = subprocess.run(servers.Edge(b.dir("probe"), b.origin_url()).command()[:7] + ["h264edge", "--help"],
                         capture_output=True, text=True, env=servers.Edge(b.dir("probe"), "").env(),
                         timeout=60).stdout
    for flag in ("--workers", "--processes"):
        if flag + "=" in out or flag + " " in out:
            return flag
    return None


def fig_miss(b: Bench) -> None:
    """5. cold miss of the ~100 MB clip: edge vs nginx proxy_cache, both in front of the origin nginx."""
    path = b.name(b.media.mid)
    size = os.path.getsize(b.media.mid)
    ttfb = b.row("5a", f"cold miss TTFB, {size / MB:.0f} MB clip via origin nginx", "ms",
                 target=("ratio<=", 2.0))
    total = b.row("5b", "cold miss total time", "s")
    rate = b.row("5c", "cold miss throughput", "MB/s", target=("ratio>=", 1.0))
    # nginx's proxy_cache never fsyncs what it caches; h264edge fdatasyncs before it lists a slice
    nosync = b.row("5d", "cold miss throughput, h264edge --no-sync (nginx's durability: no fsync)", "MB/s")
    # the edge column: a bare twisted.web + treq pass-through (bench/floor_proxy.py), the least any
    # edge built on the fixed stack pays on this machine
    floor = b.row("5e", "cold miss TTFB of a bare twisted.web + treq proxy (the fixed stack's floor)", "ms")
    # 5a asks a server just started (the only way to empty nginx's cache): a Python process's first
    # request runs every stage cold.  5f asks each server, just started too, for another object first.
    warmed = b.row("5f", "cold miss TTFB after one miss of another object (a running server)", "ms")
    # 9 by default: the cold-miss medians spread most from run to run (5 gave ratios of 0.8-1.1)
    runs = max(b.runs, 1 if b.quick else 9)
    for run in range(runs):
        for side in ("nginx", "edge", "edge --no-sync", "floor", "nginx warmed", "edge warmed"):
            if side.startswith("nginx"):
                server: servers.Server = servers.ProxyNginx(b.dir("proxy"), b.origin)
            elif side == "floor":
                server = servers.FloorProxy(b.dir("floor"), b.origin_url())
            else:
                server = servers.Edge(b.dir("edge_cold"), b.origin_url(),
                                      b.edge_extra + (["--no-sync"] if "no-sync" in side else []))
            if isinstance(server, servers.Edge):
                server.wipe()
            server.start()
            try:
                port = server.ports.get("plain", server.port)
                if side.endswith("warmed"):
                    first = clients.get(port, b.name(b.media.small), timeout=60)
                    if first.status != 200:
                        raise RuntimeError(f"{side}: status {first.status} for the first object")
                    time.sleep(0.2)  # what that miss left to do (a store's fsync, a log line) is done
                answer = clients.get(port, path, timeout=300)
            finally:
                server.stop()
            cache = answer.headers.get("x-cache", "?")
            if answer.status != 200 or "MISS" not in cache.upper():
                raise RuntimeError(f"{side}: status {answer.status}, X-Cache {cache!r} on a cold miss")
            b.log(f"  miss {side:5}: ttfb {answer.ttfb * 1000:.2f} ms, {answer.total:.3f} s")
            if side == "edge --no-sync":
                nosync.edge.append(answer.length / answer.total / MB)
                continue
            if side == "floor":
                floor.edge.append(answer.ttfb * 1000)
                floor.nginx.append(ttfb.nginx[-1])
                continue
            if side.endswith("warmed"):
                warmed.__dict__[side.split()[0]].append(answer.ttfb * 1000)
                continue
            ttfb.__dict__[side].append(answer.ttfb * 1000)
            total.__dict__[side].append(answer.total)
            rate.__dict__[side].append(answer.length / answer.total / MB)
            if side == "nginx":
                nosync.nginx.append(answer.length / answer.total / MB)


def _cold_server(b: Bench, side: str):
    if side == "nginx":
        return servers.ProxyNginx(b.dir("proxy"), b.origin), "mp4", "mp4"
    edge = servers.Edge(b.dir("edge_cold"), b.origin_url(), b.edge_extra)
    edge.wipe()
    return edge, "http", "plain"


def fig_cold_seek(b: Bench) -> None:
    """6. origin bytes for one cold mid-clip seek; origin bytes and decoding over a Zipf seek workload."""
    half = b.media.big_seconds // 2
    path = f"{b.name(b.media.big)}?start={half}"
    single = b.row("6a", f"origin MB to answer one cold ?start={half} of the "
                         f"{os.path.getsize(b.media.big) / GIB:.2f} GiB clip", "MB")
    answered = {}
    for run in range(min(b.runs, 2)):
        for side in ("nginx", "edge"):
            server, port_name, log_name = _cold_server(b, side)
            mark = b.origin.log_mark(log_name)
            server.start()
            try:
                answer = clients.get(server.ports[port_name], path, timeout=300)
                time.sleep(1.0)  # let any read-ahead show in the origin's log
            finally:
                server.stop()
            time.sleep(0.2)
            requests, sent = b.origin.bytes_since(log_name, mark)
            if answer.status != 200:
                raise RuntimeError(f"{side}: status {answer.status} for {path}")
            single.__dict__[side].append(sent / MB)
            answered[side] = (answer.length, requests)
    single.note = (f"answer {answered['edge'][0] / MB:.1f} MB; origin requests: nginx {answered['nginx'][1]}, "
                   f"h264edge {answered['edge'][1]}")

    # the Zipf workload: a clip by Zipf popularity (s=1), a start second uniform in the clip
    count = 20 if b.quick else b.args.zipf_requests
    rng = random.Random(4)
    clips = list(b.media.zipf)
    weights = [1 / (rank + 1) for rank in range(len(clips))]
    workload = []
    for _ in range(count):
        name, duration = rng.choices(clips, weights)[0]
        workload.append(f"/{name}?start={rng.randrange(0, max(duration - 2, 1))}")
    distinct = len(set(workload))
    zipf = b.row("6b", f"origin MB over {count} cold Zipf seeks ({len(clips)} clips, {distinct} distinct URLs)",
                 "MB", target=("ratio<=", 0.5))
    decode = b.row("6c", "sampled Zipf answers failing to decode (ffmpeg -xerror)", "answers",
                   target=("edge==", 0))
    samples = set(range(0, count, max(1, count // (2 if b.quick else b.args.decode_samples))))
    answer_bytes = {}
    deadline_s = b.args.zipf_deadline
    for side in ("nginx", "edge"):
        server, port_name, log_name = _cold_server(b, side)
        mark = b.origin.log_mark(log_name)
        server.start()
        saved = []
        got = 0
        t0 = time.monotonic()
        try:
            for i, request in enumerate(workload):
                save = os.path.join(b.dir(f"answers_{side}"), f"{i}.mp4") if i in samples else None
                answer = clients.get(server.ports[port_name], request, save=save, timeout=300)
                if answer.status != 200:
                    raise RuntimeError(f"{side}: status {answer.status} for {request}")
                got += answer.length
                if save:
                    saved.append(save)
                if time.monotonic() - t0 > deadline_s:
                    zipf.note += f" {side} stopped after {i + 1} requests ({deadline_s} s bound);"
                    break
            time.sleep(1.0)
        finally:
            server.stop()
        time.sleep(0.2)
        requests, sent = b.origin.bytes_since(log_name, mark)
        zipf.__dict__[side].append(sent / MB)
        answer_bytes[side] = got
        failures = 0
        for path_saved in saved:
            errors = media.decode_errors(path_saved)
            if errors:
                failures += 1
                decode.note += f" {side} {os.path.basename(path_saved)}: {errors[:120]};"
        decode.__dict__[side].append(failures)
        b.log(f"  zipf {side:5}: {sent / MB:,.1f} MB from origin in {requests} requests, "
              f"{got / MB:,.1f} MB answered in {time.monotonic() - t0:.1f} s, "
              f"{failures}/{len(saved)} sampled answers fail to decode")
        shutil.rmtree(b.dir(f"answers_{side}"), ignore_errors=True)
    zipf.note += (f" answered MB: nginx {answer_bytes['nginx'] / MB:,.1f}, "
                  f"h264edge {answer_bytes['edge'] / MB:,.1f}; every answer 200 with its full Content-Length")
    decode.note = f"{len(samples)} sampled answers per server." + decode.note


def fig_memory(b: Bench) -> None:
    """7a. RSS while holding slow viewers of the big file (bounded: N viewers, T seconds)."""
    path = b.name(b.media.big)
    b.warm(path)
    count = 50 if b.quick else b.args.viewers
    seconds = 3 if b.quick else b.args.viewer_seconds
    row = b.row("7a", f"peak RSS, {count} viewers reading 1 KiB/s for {seconds} s", "MB",
                target=("edge<=", 300))
    for side, server in (("nginx", b.direct), ("edge", b.edge)):
        before = server.rss_bytes()
        result = clients.slow_viewers(server.port, path, count, seconds, sample=server.rss_bytes)
        row.__dict__[side].append(result["peak_rss"] / MB)
        row.note += (f" {side}: RSS before {before / MB:.0f} MB, {result['connected']} connected, "
                     f"{result['served']} got bytes, {result['failed']} failed;")
        b.log(f"  viewers {side:5}: peak RSS {result['peak_rss'] / MB:.0f} MB ({result})")
        time.sleep(1.0)


def fig_index(b: Bench) -> None:
    """7b. Rebuild of the store index of N cached objects in a fresh process."""
    count = 2000 if b.quick else b.args.index_objects
    row = b.row("7b", f"index rebuild at startup, {count:,} cached objects (page cache warm)", "s",
                target=("edge<=", 10))
    root = os.path.join(b.tmp, "index_store")
    env = servers.Edge(b.dir("probe"), "").env()
    helper = os.path.join(HERE, "store_index.py")
    made = subprocess.run([servers.VENV_PYTHON, helper, "create", root, str(count)], env=env,
                          capture_output=True, text=True, timeout=900, check=True)
    b.log(f"  index: made {count} objects {made.stdout.strip()}")
    longest = []
    for run in range(min(b.runs, 3)):
        out = subprocess.run([servers.VENV_PYTHON, helper, "rebuild", root], env=env,
                             capture_output=True, text=True, timeout=600, check=True)
        result = json.loads(out.stdout)
        if result["objects"] != count:
            raise RuntimeError(f"rebuild found {result['objects']} of {count} objects")
        row.edge.append(result["seconds"])
        longest.append(result["longest_step"] * 1000)
        b.log(f"  index rebuild: {result}")
    row.note = (f"longest single step (reactor blocked) {max(longest):.0f} ms; nginx: its cache loader "
                f"walks the cache in the background (loader_files=100 per 50 ms by default), not compared")
    try:
        _serving_while_loading(b, root, count)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _serving_while_loading(b: Bench, root: str, count: int) -> None:
    """7c. twistd h264edge started on the store of 7b: answers while its IndexLoader runs."""
    path = b.name(b.media.small)
    row = b.row("7c", f"h264edge answering while it loads the {count:,}-object index: request latency "
                      f"(all samples)", "ms")
    edge = servers.Edge(b.dir("edge_loading"), b.origin_url(), b.edge_extra)
    edge.cache_dir = root
    log_path = os.path.join(edge.workdir, "twistd.log")
    if os.path.exists(log_path):
        os.unlink(log_path)
    t0 = time.monotonic()
    edge.start()
    listening = time.monotonic() - t0
    loaded_at = None
    codes = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answer = clients.get(edge.port, path, timeout=30)
            row.edge.append(answer.total * 1000)
            codes.append(answer.status)
            with open(log_path, errors="replace") as f:
                if "cache index loaded" in f.read():
                    loaded_at = time.monotonic() - t0
                    break
            time.sleep(0.02)
    finally:
        edge.stop()
    row.note = (f"twistd listening {listening:.1f} s after launch, index loaded "
                + (f"{loaded_at:.1f} s after launch" if loaded_at else "not within 60 s")
                + f"; {len(codes)} requests meanwhile, statuses {sorted(set(codes))}")


FIGURES: dict[str, Callable[[Bench], None]] = {
    "hit": fig_hit,
    "seek_ttfb": fig_seek_ttfb,
    "seek_rps": fig_seek_rps,
    "small": fig_small,
    "miss": fig_miss,
    "cold_seek": fig_cold_seek,
    "memory": fig_memory,
    "index": fig_index,
}
ALIASES = {"1": "hit", "2": "seek_ttfb", "3": "seek_rps", "4": "small", "5": "miss", "6": "cold_seek",
           "7": "memory,index"}


# -- report ---------------------------------------------------------------------------------------

def head_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=30, cwd=servers.REPO).stdout.strip()
    except Exception as e:
        return f"? ({e})"


def machine(start_commit: str) -> dict:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])

    def run(cmd: list) -> str:
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=servers.REPO)
            return (result.stdout + result.stderr).strip()
        except Exception as e:
            return f"? ({e})"

    dirty = run(["git", "status", "--porcelain", "--", "h264edge", "twisted", "setup.cfg"])
    return {
        "cpu": model, "nproc": os.cpu_count(), "mem": f"{mem_kb / 2**20:.1f} GiB",
        "kernel": platform.release(), "nginx": run(["/usr/sbin/nginx", "-v"]).replace("nginx version: ", ""),
        "python": run([servers.VENV_PYTHON, "-c", "import sys, twisted; print(sys.version.split()[0], "
                                                   "'twisted', twisted.__version__)"]),
        "commit": (start_commit if start_commit == head_commit()
                   else f"{start_commit} at the start, {head_commit()} at the end (colleagues committed meanwhile)")
        + (f" + uncommitted changes in {len(dirty.splitlines())} server file(s) at the end" if dirty else ""),
    }


def table(rows: list[Row]) -> list[str]:
    lines = ["| # | figure | unit | nginx | h264edge | ratio | target | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.ratio()
        lines.append(f"| {r.key} | {r.title} | {r.unit} | {fmt(Row._stat(r.nginx))} | {fmt(Row._stat(r.edge))} | "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}'} | {r.target_text()} | {r.verdict()} |")
    return lines


def write_report(b: Bench, path: str, info: dict, started: float, loads: tuple) -> None:
    lines = [
        "# h264edge vs nginx: benchmark results",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(started))}, "
        f"run took {(time.time() - started) / 60:.1f} min{' (--quick smoke run)' if b.quick else ''}",
        f"- machine: {info['cpu']}, nproc {info['nproc']}, {info['mem']} RAM, Linux {info['kernel']}",
        f"- software: nginx {info['nginx']} (Debian nginx-extras), Python {info['python']}",
        f"- h264edge commit: {info['commit']} (the working tree as it was during the run)",
        f"- load average at start / end: {loads[0]} / {loads[1]} (other sessions share these 2 cores)",
        f"- command: `{' '.join(['python', 'bench/run.py'] + sys.argv[1:])}`; runs per figure: {b.runs} (cold figures: 9 for 5, 2 for 6a, 1 for the Zipf workload)",
        "- every server has ONE process (nginx `worker_processes 1`, h264edge one twistd), all on 127.0.0.1; "
        "cells are median [min-max] over runs (figure 2: over all its samples)",
        "",
        *table(b.rows),
        "",
        "## Notes",
        "",
    ]
    for r in b.rows:
        if r.note or r.error:
            lines.append(f"- {r.key}: {(r.error and 'ERROR ' + r.error + '. ') or ''}{r.note.strip()}")
    lines += [f"- {n}" for n in b.notes]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# -- main -----------------------------------------------------------------------------------------

def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny media, 1 run each (< 2 min)")
    parser.add_argument("--only", default="", help="comma list of figures: " + ", ".join(FIGURES)
                        + " (or numbers 1-7)")
    parser.add_argument("--runs", type=int, default=0, help="repetitions per figure (default 5; quick 1)")
    parser.add_argument("--discard-in-kernel", action="store_true",
                        help="client drops bodies with recv(MSG_TRUNC) instead of copying them (see clients.py)")
    parser.add_argument("--media", default=os.environ.get("H264EDGE_BENCH_MEDIA", "/work/bench-media"),
                        help="where generated media live (reused when present)")
    parser.add_argument("--out", default="", help="report path (default bench/RESULTS.md for a full run of "
                        "every figure, else bench/out/RESULTS-quick.md or -partial.md)")
    parser.add_argument("--edge-arg", action="append", help="extra option for twistd h264edge (repeatable)")
    parser.add_argument("--wrk-seconds", type=float, default=5)
    parser.add_argument("--zipf-requests", type=int, default=200)
    parser.add_argument("--zipf-deadline", type=float, default=300, help="seconds bound per server")
    parser.add_argument("--decode-samples", type=int, default=8)
    parser.add_argument("--viewers", type=int, default=1000)
    parser.add_argument("--viewer-seconds", type=int, default=20)
    parser.add_argument("--index-objects", type=int, default=100_000)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    parser.add_argument("--profile-edge", metavar="FILE", default="",
                        help="run the shared (warm) h264edge under twistd's cProfile and save pstats to FILE "
                             "(figures 1-4 and 7a then measure a profiled server: for finding hot spots only)")
    args = parser.parse_args(argv)

    names = []
    for item in filter(None, args.only.split(",")):
        for name in ALIASES.get(item, item).split(","):
            if name not in FIGURES:
                parser.error(f"unknown figure {name!r}")
            names.append(name)
    names = names or list(FIGURES)
    out = args.out or os.path.join(HERE, "RESULTS.md" if not args.quick and names == list(FIGURES)
                                   else f"out/RESULTS-{'quick' if args.quick else 'partial'}.md")

    for tool in ("nginx", "wrk", "ffmpeg"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            raise SystemExit(f"{tool} is needed")
    servers.raise_nofile()
    clients.DISCARD_IN_KERNEL = args.discard_in_kernel
    started = time.time()
    start_commit = head_commit()
    with open("/proc/loadavg") as f:
        load_start = " ".join(f.read().split()[:3])
    b = Bench(args)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    atexit.register(servers.stop_all)
    failed = False
    try:
        b.media = media.make(args.media, args.quick, log=b.log)
        b.start_shared()
        for name in names:
            b.log(f"figure {name}: {FIGURES[name].__doc__.strip().splitlines()[0]}")
            before = len(b.rows)
            for attempt in (1, 2):
                try:
                    b.ensure_up()
                    FIGURES[name](b)
                    break
                except Exception as e:
                    traceback.print_exc()
                    if attempt == 1 and not all(s.alive() for s in (b.origin, b.direct, b.edge)):
                        b.log(f"figure {name}: a server died meanwhile; once more")
                        del b.rows[before:]
                        continue
                    failed = True
                    if len(b.rows) == before:
                        b.row(name, name, "", note="")
                    b.rows[-1].error = f"{type(e).__name__}: {e}"[:300]
                    break
    finally:
        servers.stop_all()
        if not args.keep:
            shutil.rmtree(b.tmp, ignore_errors=True)
        else:
            print(f"kept {b.tmp}")
    with open("/proc/loadavg") as f:
        load_end = " ".join(f.read().split()[:3])
    info = machine(start_commit)
    print("\n".join(table(b.rows)))
    for r in b.rows:
        if r.note or r.error:
            print(f"  {r.key}: {r.error} {r.note.strip()}")
    for n in b.notes:
        print(f"  {n}")
    write_report(b, out, info, started, (load_start, load_end))
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    with open(os.path.join(HERE, "out", "results-quick.json" if args.quick else "results.json"), "w") as f:
        json.dump([r.__dict__ for r in b.rows], f, indent=1)
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
