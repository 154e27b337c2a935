"""
The servers under test, all on 127.0.0.1: three nginx instances and h264edge (twistd), each a child
process of the benchmark, each stopped at the end (also on failure), each measurable (CPU, RSS).

  origin   nginx, plain static files (port ``plain``) and the same files with the mp4 module (port
           ``mp4``); each port writes its own access log with $bytes_sent, the only logs we keep.
  direct   nginx serving the media directly with the mp4 module: the hit and seek figures.
  proxy    nginx proxy_cache in front of the origin: port ``plain`` -> origin plain (miss figure),
           port ``mp4`` -> origin mp4 (cold seeks: nginx forwards ?start and caches per start).
  edge     h264edge in front of the plain origin port.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from typing import Optional

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the interpreter that runs h264edge: the checkout's .venv that dev/setup makes, unless overridden
VENV_PYTHON = os.environ.get("H264EDGE_BENCH_PYTHON") or os.path.join(REPO, ".venv", "bin", "python")

# twisted.scripts.twistd has no __main__ block: run it the way the twistd console script does
# (-P: no working directory on sys.path, so a stray h2.py or the like cannot shadow a package)
TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"

_running: list["Server"] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(name))
    return found


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


class Server:
    """One child process tree (a master and its workers): start, stop, CPU seconds, RSS."""

    name = "server"

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.proc: Optional[subprocess.Popen] = None
        self.ports: dict[str, int] = {}

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> "Server":
        os.makedirs(self.workdir, exist_ok=True)
        self.prepare()
        out = open(os.path.join(self.workdir, "stdout.log"), "ab")
        self.proc = subprocess.Popen(
            self.command(), cwd=self.workdir, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=raise_nofile,
        )
        out.close()
        _running.append(self)
        try:
            for port in self.ports.values():
                wait_port(port, self.proc)
        except Exception:
            self.stop()
            raise
        return self

    def prepare(self) -> None:
        pass

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if self in _running:
            _running.remove(self)
        if proc is None or proc.poll() is not None:
            return
        pgid = proc.pid  # start_new_session: the child leads its own process group
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait(5)
        # nginx workers leave with the master; make sure nothing of the group stays behind
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [self.proc.pid] + _children(self.proc.pid)

    def cpu_seconds(self) -> float:
        """utime + stime of the whole tree (master and workers), in seconds."""
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
        return total / CLK_TCK

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * PAGE
            except OSError:
                continue
        return total


NGINX_MAIN = """\
# written by bench/servers.py
worker_processes {workers};
daemon off;
master_process on;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    types {{ video/mp4 mp4; video/x-flv flv; application/octet-stream bin; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    access_log off;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/tmp_client;
    proxy_temp_path {dir}/tmp_proxy;
    fastcgi_temp_path {dir}/tmp_fastcgi;
    uwsgi_temp_path {dir}/tmp_uwsgi;
    scgi_temp_path {dir}/tmp_scgi;
    log_format bytes '$request_uri $status $bytes_sent $body_bytes_sent $request_time';
{body}
}}
"""

MP4_LOCATION = """\
        location ~ \\.mp4$ {{
            mp4;
            mp4_start_key_frame on;
            mp4_buffer_size 1m;
            mp4_max_buffer_size 128m;
        }}"""


class Nginx(Server):
    """nginx -p DIR -c DIR/nginx.conf, daemon off, run as root (user root; so workers read anything)."""

    name = "nginx"
    binary = "/usr/sbin/nginx"

    def __init__(self, workdir: str, workers: int = 1) -> None:
        super().__init__(workdir)
        self.workers = workers

    def servers(self) -> str:
        raise NotImplementedError

    def prepare(self) -> None:
        conf = NGINX_MAIN.format(workers=self.workers, dir=self.workdir, body=self.servers())
        with open(os.path.join(self.workdir, "nginx.conf"), "w") as f:
            f.write(conf)
        subprocess.run([self.binary, "-t", "-q", "-p", self.workdir, "-c", "nginx.conf"], check=True,
                       cwd=self.workdir, capture_output=True)

    def command(self) -> list[str]:
        # exec through a symlink named without "nginx": a colleague's `killall nginx` / `pkill nginx`
        # (which match the process name) then leaves the benchmark's servers alone
        alias = os.path.join(self.workdir, "ngx-bench")
        if not os.path.islink(alias):
            os.symlink(self.binary, alias)
        return [alias, "-p", self.workdir, "-c", "nginx.conf"]


class OriginNginx(Nginx):
    name = "origin"

    def __init__(self, workdir: str, media: str) -> None:
        super().__init__(workdir, workers=1)
        self.media = media
        self.ports = {"plain": free_port(), "mp4": free_port()}

    def servers(self) -> str:
        return f"""
    server {{
        listen 127.0.0.1:{self.ports['plain']} backlog=4096;
        root {self.media};
        access_log {self.workdir}/origin_plain.log bytes;
        expires 1d;  # an explicit lifetime: without one, a cache's heuristic depends on the media's age
    }}
    server {{
        listen 127.0.0.1:{self.ports['mp4']} backlog=4096;
        root {self.media};
        access_log {self.workdir}/origin_mp4.log bytes;
        expires 1d;
{MP4_LOCATION.format()}
    }}"""

    def log_path(self, which: str) -> str:
        return os.path.join(self.workdir, f"origin_{which}.log")

    def log_mark(self, which: str) -> int:
        try:
            return os.path.getsize(self.log_path(which))
        except OSError:
            return 0

    def bytes_since(self, which: str, mark: int) -> tuple[int, int]:
        """(requests, bytes sent incl. headers) logged on port C{which} since C{mark}."""
        try:
            with open(self.log_path(which), "rb") as f:
                f.seek(mark)
                lines = f.read().decode().splitlines()
        except OSError:
            return 0, 0
        total = 0
        for line in lines:
            parts = line.split()
            if len(parts) >= 3:
                total += int(parts[2])
        return len(lines), total


class DirectNginx(Nginx):
    """nginx serving the media files itself, with the mp4 module: hits and seeks."""

    name = "nginx"

    def __init__(self, workdir: str, media: str, workers: int = 1) -> None:
        super().__init__(workdir, workers)
        self.media = media
        self.ports = {"http": free_port()}

    def servers(self) -> str:
        return f"""
    server {{
        listen 127.0.0.1:{self.ports['http']} backlog=4096;
        root {self.media};
{MP4_LOCATION.format()}
    }}"""


class ProxyNginx(Nginx):
    """nginx proxy_cache in front of the origin (one cached object per URI, query included)."""

    name = "nginx-proxy"

    def __init__(self, workdir: str, origin: OriginNginx) -> None:
        super().__init__(workdir, workers=1)
        self.origin = origin
        self.ports = {"plain": free_port(), "mp4": free_port()}

    def prepare(self) -> None:
        shutil.rmtree(os.path.join(self.workdir, "cache"), ignore_errors=True)
        super().prepare()

    def servers(self) -> str:
        o = self.origin.ports
        loc = """
            proxy_pass http://{up};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache edge;
            proxy_cache_valid 200 206 1d;
            proxy_cache_lock on;
            proxy_cache_key $scheme$proxy_host$request_uri;
            add_header X-Cache $upstream_cache_status;"""
        return f"""
    proxy_cache_path {self.workdir}/cache levels=1:2 keys_zone=edge:64m max_size=50g inactive=1d
                     use_temp_path=off;
    upstream origin_plain {{ server 127.0.0.1:{o['plain']}; keepalive 32; }}
    upstream origin_mp4 {{ server 127.0.0.1:{o['mp4']}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{self.ports['plain']} backlog=4096;
        location / {{{loc.format(up='origin_plain')}
        }}
    }}
    server {{
        listen 127.0.0.1:{self.ports['mp4']} backlog=4096;
        location / {{{loc.format(up='origin_mp4')}
        }}
    }}"""


class Edge(Server):
    """h264edge under twistd -n, in front of the origin's plain port; cache dir wiped on start if cold."""

    name = "h264edge"

    def __init__(self, workdir: str, origin_url: str, extra: Optional[list[str]] = None,
                 repo: str = REPO) -> None:
        super().__init__(workdir)
        self.origin_url = origin_url
        self.extra = extra or []
        self.repo = repo
        self.cache_dir = os.path.join(workdir, "cache")
        self.ports = {"http": free_port()}
        self.twistd_options: list[str] = []  # before the subcommand, e.g. --profile

    def wipe(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = self.repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def command(self) -> list[str]:
        return [
            VENV_PYTHON, "-P", "-c", TWISTD, "-n",
            "--pidfile", os.path.join(self.workdir, "twistd.pid"),
            "--logfile", os.path.join(self.workdir, "twistd.log"),
            *self.twistd_options,
            "h264edge", f"--origin={self.origin_url}", f"--cache-dir={self.cache_dir}",
            "--max-size=50G", f"--listen=tcp:{self.ports['http']}:interface=127.0.0.1",
            "--access-log=off",  # like nginx's access_log off
            *self.extra,
        ]


class FloorProxy(Server):
    """bench/floor_proxy.py: a bare twisted.web + treq pass-through, the floor of a Twisted edge's cold miss."""

    name = "floor-proxy"

    def __init__(self, workdir: str, origin_url: str) -> None:
        super().__init__(workdir)
        self.origin_url = origin_url
        self.ports = {"http": free_port()}

    def command(self) -> list[str]:
        return [VENV_PYTHON, os.path.join(REPO, "bench", "floor_proxy.py"), str(self.ports["http"]), self.origin_url]


def stop_all() -> None:
    for server in list(reversed(_running)):
        try:
            server.stop()
        except Exception as e:  # keep stopping the others
            print(f"could not stop {server.name}: {e}")
