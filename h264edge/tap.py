# -*- test-case-name: tests.test_tap -*-
"""
C{twistd h264edge}: command-line options and the service graph (index loader + HTTP site, and with
C{--workers=N} the worker processes sharing its port and cache, see L{h264edge.workers}).
"""

from __future__ import annotations

import functools
import gc
import ipaddress
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlsplit

from twisted.application import service, strports
from twisted.internet import defer, endpoints, task, threads
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger, jsonFileLogObserver
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from h264edge.config import ConfigError, config_arguments, config_path, load_config
from h264edge.lifecycle import EdgeService, SignalHandlers, StartupRefused, forward_signal, open_more_files

from h264edge.fill import Filler
from h264edge.health import HealthChecks, OriginHealth, OriginState, RetryBudget
from h264edge.origin import OriginClient
from h264edge.s3 import S3ConfigError, S3Location, S3Origin, load_credentials
from h264edge.store import SliceStore
from h264edge.tiers import BadEdgeName, check_name
from h264edge.store._fill_locks import FillLocks
from h264edge.store._store import ORPHAN_GRACE, CacheDirUnusable, check_cache_dir, default_min_free
from h264edge.metrics import HISTORY_STEP, EdgeMetrics
from h264edge.web.admin import admin_resource, admin_site, read_token_file
from h264edge.web.hot import EdgeSite
from h264edge.web.http import TOKEN_CHARS, parse_networks
from h264edge.web.limits import ConnectionLimits
from h264edge.web.player import PlayerPage, ViewerRoot
from h264edge.web.producer import ThrottlePolicy
from h264edge.web.resource import EdgeResource
from h264edge.workers import LISTEN_FD, STOP_TIMEOUT, InheritedPort, WorkerPool, site_naming_process

log = Logger()

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")  # RFC 9110 §9.1: method = token


def parse_size(value: str) -> int:
    """C{"50G"} -> bytes; suffixes K, M, G, T are powers of 1024."""
    match = _SIZE.match(value)
    if match is None:
        raise usage.UsageError(f"{value!r} is not a size (examples: 512M, 50G, 1T)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


_SHARE = re.compile(r"^\s*(\d{1,2}(?:\.\d{1,3})?)\s*%\s*$")


def parse_min_free(value: str) -> int | float | None:
    """
    C{--min-free}: C{"auto"} -> None (the store's default), C{"5%"} -> 0.05 (a share of the cache's
    file system, below 100%), a size -> bytes.
    """
    if value.strip().lower() == "auto":
        return None
    match = _SHARE.match(value)
    if match is not None:
        return float(match.group(1)) / 100
    try:
        return parse_size(value)
    except usage.UsageError:
        raise usage.UsageError(f"--min-free={value!r} is not a size, a percentage below 100% or 'auto'") from None


def min_free_bytes(setting: int | float | None, cache_dir: str) -> int:
    """The floor in bytes for a parsed C{--min-free} on the file system of C{cache_dir}."""
    if setting is None:
        return default_min_free(cache_dir)
    if isinstance(setting, float):
        st = os.statvfs(cache_dir)
        return int(st.f_blocks * st.f_frsize * setting)
    return setting


REPEATABLE = {"origin": "origins", "pass-method": "pass-methods", "trusted-proxy": "trusted-proxies"}
"""Options that may be given several times -> the list they fill."""


class Options(usage.Options):
    """
    C{twistd h264edge}'s options, also read from C{--config FILE} (TOML, see L{h264edge.config}).

    Under twistd (or C{h264edge serve}) a bad value ends the process with one line naming the
    option (L{StartupRefused}); on its own, L{parseOptions} raises L{usage.UsageError} as usual.
    """

    synopsis = "--origin=URL [--origin=URL2 ...] [options]"
    longdesc = (
        "Serve H.264/MP4 (and any other) files from ORIGIN through a local disk cache, with "
        "pseudo-streaming seeks: clip.mp4?start=SECONDS[&end=SECONDS] and clip.flv?start=BYTES. "
        "Every option can also be given in a TOML file (--config); the command line wins."
    )
    optParameters: list[list[Any]] = [
        ["config", None, None, "TOML file of options (keys are the long option names); the command line wins."],
        ["cache-dir", "d", "/var/cache/h264edge", "Directory of the disk cache (created if missing)."],
        ["max-size", "s", "10G", "Bytes of disk the cache may use (K/M/G/T suffixes)."],
        ["min-free", None, "auto", "Free space kept on the cache's file system, evicting to keep it: a size or "
         "a percentage of the file system; auto: 1G, or 5% if that is less."],
        ["listen", "l", "tcp:8080", "Where to listen for viewers (a Twisted endpoint description: tcp:8080, "
         "tcp:80:interface=192.0.2.1, systemd:domain=INET:index=0)."],
        ["slice-size", None, "1M", "Cache objects are kept in slices of this many bytes."],
        ["default-ttl", None, "3600", "Seconds an answer stays fresh when the origin gives neither freshness nor "
         "Last-Modified, and the cap of the heuristic freshness (10% of the time since Last-Modified)."],
        ["stale-if-error", None, "86400", "Seconds past its freshness a stored answer may stand in when the "
         "origins fail, unless the answer says otherwise (stale-if-error) or forbids it (must-revalidate)."],
        ["origin-timeout", None, "10", "Seconds to wait for an origin to connect or answer."],
        ["origin-idle-timeout", None, "30", "Seconds an origin body may stay silent before it is dropped "
         "(and resumed, from the next origin if that one is now marked down)."],
        ["origin-retry-after", None, "1", "Seconds an origin is skipped after a connect failure or timeout "
         "(doubling up to 60 while it keeps failing; then one request tries it again)."],
        ["origin-retry-budget", None, "0.2", "Extra origin attempts (failover, resumption) allowed, as a share "
         "of the requests of the last 10 s (plus 5 per second)."],
        ["origin-connections", None, "0", "Requests in flight per origin at most (0: no limit)."],
        ["origin-check", None, "", "Path to HEAD on every origin in the background (empty: no health checks)."],
        ["origin-check-interval", None, "5", "Seconds between health checks of each origin."],
        ["origin-rise", None, "2", "Good health checks in a row that mark a down origin up."],
        ["origin-fall", None, "3", "Failed health checks (or 5xx answers) in a row that mark an origin down."],
        ["seek-cache", None, "256M", "Memory for parsed MP4 seek indexes, plus a quarter more for recent seek answers."],
        ["max-moov", None, "64M", "Largest MP4 moov box the edge will parse for a seek."],
        ["workers", None, "1", "Processes serving the --listen port (TCP only) from one cache directory."],
        ["hot-cache", None, "64M", "Memory (per process) for whole answers to plain GETs of small cached "
         "objects (up to 64K), served without twisted.web's per-request machinery; 0 turns this hot path off."],
        ["access-log", None, "", "Access log: a file path, 'off', or empty for the twistd log."],
        ["access-log-format", None, "combined", "Access log lines: 'combined' (Apache/nginx combined, then "
         "cache=, time=, ttfb=, cut=) or 'json' (one object per answer)."],
        ["event-log", None, "", "File of structured events (JSON lines through twisted.logger): fills, origin "
         "errors, evictions, purges; empty: none."],
        ["drain-timeout", None, "30", "Seconds viewers get to finish their answers after SIGTERM."],
        ["admin-listen", None, "", "Where the admin listener (/metrics, /status, /healthz, /readyz, /purge) "
         "listens: an endpoint description such as tcp:9080:interface=127.0.0.1; empty: none."],
        ["admin-token", None, None, "Token purges must send (Authorization: Bearer TOKEN), on the admin "
         "listener and on the viewer port; --admin-token-file keeps it out of the process list."],
        ["admin-token-file", None, None, "File whose first line is the admin token (read again on SIGHUP)."],
        ["limit-rate", None, "0", "Pace each answer that is not an MP4 to this many bytes/s (K/M/G suffixes) "
         "after --limit-rate-after; 0: no limit."],
        ["limit-rate-after", None, "0", "Bytes of an answer sent at full speed before --limit-rate applies."],
        ["mp4-limit-rate", None, "0", "Pace each MP4 answer to this factor times the clip's bitrate (read from "
         "its moov) after --mp4-limit-rate-after; 0: no limit."],
        ["mp4-limit-rate-after", None, "60", "Seconds of an MP4 clip sent at full speed before --mp4-limit-rate "
         "applies."],
        ["header-timeout", None, "10", "Seconds a viewer has to send a whole request head (from its first byte, or "
         "from connecting); then 408 and the connection is closed."],
        ["idle-timeout", None, "60", "Seconds a kept-alive connection may wait for its next request."],
        ["send-timeout", None, "60", "Seconds a connection may make no progress while the edge waits on the "
         "viewer (an answer it does not read, a request body it stops sending); then it is dropped."],
        ["max-connections", None, "auto", "Viewer connections at once (per process); 'auto' is the descriptor "
         "limit (ulimit -n) less 128, halved, at least 16.  At the cap the connection idle longest is closed, "
         "else 503."],
        ["max-connections-per-ip", None, "0", "Viewer connections at once from one address (per process); "
         "0: no cap (an edge behind a load balancer sees one address)."],
        ["max-body", None, "1M", "Largest request body of a --pass-method (GET/HEAD take at most 8K); 413 above."],
        ["name", None, socket.gethostname(), "This edge's name in Via and Cache-Status; a request whose Via "
         "already names it is refused with 508 (give each edge of a chain its own name)."],
        ["s3-endpoint", None, "", "URL of the S3-compatible endpoint for s3:// origins (path-style requests)."],
        ["s3-region", None, "us-east-1", "Region s3:// requests are signed for (AWS Signature V4)."],
        ["s3-credentials", None, "", "AWS shared-credentials file for s3:// origins (else the AWS_* variables, "
         "then ~/.aws/credentials)."],
        ["s3-profile", None, "", "Profile to read from the credentials file (else AWS_PROFILE, else 'default')."],
    ]
    optFlags: list[list[Any]] = [
        ["ignore-query", None, "Leave the query string out of the cache key (tracking parameters)."],
        ["exact-seek", None, "Start MP4 seeks exactly at start= (lead-in hidden by an edit list)."],
        ["no-sync", None, "Do not fdatasync before recording slices as present (faster; unsafe on power loss)."],
        ["no-player", None, "Do not serve the demo player page at /player on the viewer listener."],
        ["viewer-no-cache", None, "Honour viewers' Cache-Control no-cache / max-age / min-fresh (and Pragma: "
         "no-cache): they make the edge revalidate with the origin."],
        ["cache-set-cookie", None, "Store answers that carry Set-Cookie, without the Set-Cookie (by default "
         "they pass through unstored)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["origins"] = []
        self["pass-methods"] = []
        self["trusted-proxies"] = []
        self["listen-fd"] = None
        self.raw_argv: list[str] = []

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """
        Also reads C{--config}, keeps the command line for worker processes, and takes the hidden
        C{--listen-fd=N} that the first process gives its workers (the inherited listening socket).
        """
        try:
            self._parse(options)
        except (usage.UsageError, ConfigError) as e:
            if getattr(self, "parent", None) is None:
                raise usage.UsageError(str(e)) from None
            # under twistd: one line, not the whole --help text before it
            raise StartupRefused(f"h264edge: {e}  (twistd h264edge --help lists the options)") from None

    def _parse(self, options: Optional[Sequence[str]]) -> None:
        argv = list(sys.argv[1:] if options is None else options)
        self.raw_argv = []
        for arg in argv:
            if arg.startswith("--listen-fd="):
                try:
                    self["listen-fd"] = int(arg.partition("=")[2])
                except ValueError:
                    raise usage.UsageError(f"{arg!r}: not a descriptor number") from None
            else:
                self.raw_argv.append(arg)
        from_file: list[str] = []
        path = config_path(self.raw_argv)
        if path is not None:
            from_file = config_arguments(load_config(path), path, self._parameters(), self._flags(), REPEATABLE,
                                         given=self.raw_argv)
        super().parseOptions(from_file + self.raw_argv)

    def _parameters(self) -> list[str]:
        return [str(p[0]) for p in self.optParameters] + list(REPEATABLE)

    def _flags(self) -> list[str]:
        return [str(f[0]) for f in self.optFlags]

    def worker_argv(self) -> list[str]:
        """The command running one worker: these options without --workers, on the inherited socket."""
        args: list[str] = []
        skip = False
        for arg in self.raw_argv:
            if skip:
                skip = False
            elif arg == "--workers":
                skip = True
            elif not arg.startswith("--workers="):
                args.append(arg)
        return [sys.executable, "-m", "twisted", "--log-format=text", "h264edge", *args, f"--listen-fd={LISTEN_FD}"]

    def opt_version(self) -> None:
        """Print h264edge's version (and Twisted's) and exit."""
        from twisted import __version__ as twisted_version

        from h264edge import __version__

        print(f"h264edge {__version__} (Twisted {twisted_version})")
        sys.exit(0)

    def opt_origin(self, url: str) -> None:
        """Origin base URL (http://, https://, or s3://BUCKET/PREFIX); give it several times for failover in order."""
        if not url.startswith(("http://", "https://", "s3://")):
            raise usage.UsageError(f"--origin={url!r} must be an http://, https:// or s3:// URL")
        if url.startswith("s3://"):
            try:
                url = S3Location.parse(url).base
            except S3ConfigError as e:
                raise usage.UsageError(f"--origin: {e}") from None
        else:
            check_origin(url)
        self["origins"].append(url)

    def opt_pass_method(self, method: str) -> None:
        """Forward this HTTP method to the origin uncached (repeatable)."""
        if not _METHOD.fullmatch(method):
            raise usage.UsageError(f"--pass-method={method!r} is not a method name (an RFC 9110 token)")
        self["pass-methods"].append(method.upper())

    def opt_trusted_proxy(self, address: str) -> None:
        """A proxy (address or CIDR network) whose X-Forwarded-For names the client (repeatable)."""
        try:
            parse_networks([address])
        except ValueError as e:
            raise usage.UsageError(f"--trusted-proxy={address}: {e}") from None
        self["trusted-proxies"].append(address)

    def _s3_origins(self) -> list[S3Origin]:
        """The s3:// origins, with their endpoint and credentials (loaded now: a missing one is a usage error)."""
        locations = [S3Location.parse(url) for url in self["origins"] if url.startswith("s3://")]
        if not locations:
            return []
        if not self["s3-endpoint"]:
            raise usage.UsageError("s3:// origins need --s3-endpoint=URL")
        try:
            credentials = load_credentials(self["s3-credentials"] or None, self["s3-profile"] or None)
            return [S3Origin(location, self["s3-endpoint"], self["s3-region"], credentials)
                    for location in locations]
        except S3ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        if not self["origins"]:
            raise usage.UsageError("--origin=URL is required")
        for name in ("max-size", "slice-size", "seek-cache", "max-moov", "hot-cache", "limit-rate", "limit-rate-after"):
            self[name] = _option_size(name, self[name])
        self["min-free"] = parse_min_free(self["min-free"])
        for name in ("default-ttl", "origin-timeout", "origin-idle-timeout", "origin-retry-after",
                     "origin-check-interval", "origin-retry-budget", "stale-if-error", "drain-timeout",
                     "mp4-limit-rate", "mp4-limit-rate-after"):
            self[name] = parse_number(name, self[name])
        for name in ("origin-connections", "origin-rise", "origin-fall"):
            self[name] = parse_count(name, self[name])
        if self["origin-rise"] < 1 or self["origin-fall"] < 1:
            raise usage.UsageError("--origin-rise and --origin-fall must be at least 1")
        for name in ("origin-timeout", "origin-idle-timeout", "origin-retry-after", "origin-check-interval"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be more than 0 seconds")
        for name in ("header-timeout", "idle-timeout", "send-timeout"):
            self[name] = parse_number(name, self[name])
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be more than 0 seconds")
        self["max-body"] = parse_size(self["max-body"])
        if self["max-connections"] == "auto":
            self["max-connections"] = 0
        else:
            self["max-connections"] = parse_count("max-connections", self["max-connections"])
        self["max-connections-per-ip"] = parse_count("max-connections-per-ip", self["max-connections-per-ip"])
        if self["slice-size"] < 64 * 1024:
            raise usage.UsageError("--slice-size must be at least 64K")
        if self["max-size"] < self["slice-size"]:
            raise usage.UsageError(f"--max-size={self['max-size']} is smaller than one slice (--slice-size="
                                   f"{self['slice-size']}): nothing could be cached")
        try:
            self["workers"] = int(self["workers"])
        except ValueError:
            raise usage.UsageError("--workers must be a whole number") from None
        if not 1 <= self["workers"] <= 256:
            raise usage.UsageError("--workers must be between 1 and 256")
        self["s3-origins"] = self._s3_origins()
        try:
            check_name(self["name"])
        except BadEdgeName as e:
            raise usage.UsageError(f"--name={e}") from None
        if self["access-log-format"] not in ("combined", "json"):
            raise usage.UsageError(f"--access-log-format={self['access-log-format']}: 'combined' or 'json'")
        check_endpoint("listen", self["listen"])
        if self["admin-listen"]:
            check_endpoint("admin-listen", self["admin-listen"])
        if self["admin-token"] is not None and self["admin-token-file"] is not None:
            raise usage.UsageError("--admin-token and --admin-token-file: give one of them")
        if self["admin-token"] is not None and not TOKEN_CHARS.fullmatch(self["admin-token"]):
            raise usage.UsageError("--admin-token: use 1-4096 letters, digits and -._~+/ (then = only)")
        if self["workers"] > 1 and self["listen-fd"] is None:
            self["tcp-listen"] = tcp_listen_address(self["listen"])


_NUMBER = re.compile(r"^[0-9]{1,9}(?:\.[0-9]{1,9})?$")


def parse_number(name: str, value: str) -> float:
    """A non-negative decimal option value (seconds, a ratio)."""
    if not _NUMBER.match(value.strip()):
        raise usage.UsageError(f"--{name} must be a non-negative number, not {value!r}")
    return float(value)


def parse_count(name: str, value: str) -> int:
    if not re.match(r"^[0-9]{1,6}$", value.strip()):
        raise usage.UsageError(f"--{name} must be a whole number, not {value!r}")
    return int(value)


def _option_size(name: str, value: Any) -> int:
    try:
        return parse_size(str(value))
    except usage.UsageError as e:
        raise usage.UsageError(f"--{name}: {e}") from None


def check_origin(url: str) -> str:
    """An http(s) C{--origin} URL: a host name and a valid port; else a usage error."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise usage.UsageError(f"--origin={url!r}: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise usage.UsageError(f"--origin={url!r} must be an http:// or https:// URL")
    if not parts.hostname:
        raise usage.UsageError(f"--origin={url!r} has no host name (example: http://origin.example:8000/)")
    if port == 0:
        raise usage.UsageError(f"--origin={url!r}: port 0 is not a port")
    if parts.query or parts.fragment:
        raise usage.UsageError(f"--origin={url!r}: a base URL has no query string or fragment")
    if "@" in parts.netloc:  # Twisted's client would take "user:pass@host" for the host name
        raise usage.UsageError(f"--origin={url!r}: credentials in the URL are not sent (the edge forwards "
                               f"viewers' Authorization; an S3 origin takes --s3-credentials)")
    return url


def check_endpoint(name: str, description: str) -> None:
    """A listening endpoint description that Twisted can build; C{8080} gets a suggestion."""
    if re.fullmatch(r"\d{1,5}", description.strip()):
        raise usage.UsageError(f"--{name}={description} is not an endpoint description; did you mean "
                               f"--{name}=tcp:{description.strip()}?")
    if description.startswith("systemd:"):
        return  # needs the sockets systemd passes at start: checked then (see listening_service)
    try:
        endpoints.serverFromString(MemoryReactor(), description)
    except OSError:
        pass  # a file it names (an ssl: certificate): read when it listens, and refused then
    except Exception as e:
        raise usage.UsageError(f"--{name}={description}: {e} (examples: tcp:8080, tcp:80:interface=192.0.2.1)") \
            from None


_PORT = re.compile(r"[0-9]{1,5}")


def _endpoint_fields(description: str) -> list[str]:
    """The colon-separated fields of an endpoint description, with Twisted's backslash escapes undone."""
    fields, current, chars = [], [], iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, "\\"))
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def tcp_listen_address(description: str) -> tuple[str, int, int]:
    """
    C{(interface, port, backlog)} of a C{tcp:} or C{tcp6:} endpoint description (the forms
    C{twistd --listen} takes for them: C{tcp:8080:interface=127.0.0.1:backlog=100},
    C{tcp6:port=8080:interface=\\:\\:1}, positional fields in Twisted's order); anything else, or a
    field that is not what it should be, is a usage error naming it.
    """
    fields = _endpoint_fields(description)
    kind = fields[0].lower()
    if kind not in ("tcp", "tcp6"):
        raise usage.UsageError(f"--listen={description!r}: --workers needs a TCP --listen (tcp:PORT or tcp6:PORT)")
    order = ("port", "interface", "backlog") if kind == "tcp" else ("port", "backlog", "interface")
    values: dict[str, str] = {}
    positional = 0
    for field in fields[1:]:
        name, equals, value = field.partition("=")
        if not equals:
            if positional >= len(order):
                raise usage.UsageError(f"--listen={description!r}: too many fields")
            name, value = order[positional], field
            positional += 1
        if name not in order:
            raise usage.UsageError(f"--listen={description!r}: {kind}: knows no {name!r} (port, interface, backlog)")
        if name in values:
            raise usage.UsageError(f"--listen={description!r}: {name} given twice")
        values[name] = value
    port_text, backlog_text = values.get("port", ""), values.get("backlog", "50")
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise usage.UsageError(f"--listen={description!r}: the port must be a number from 0 to 65535")
    if not _PORT.fullmatch(backlog_text) or not 1 <= int(backlog_text) <= 65535:
        raise usage.UsageError(f"--listen={description!r}: backlog must be a number from 1 to 65535")
    interface = values.get("interface", "" if kind == "tcp" else "::")
    try:
        address = ipaddress.ip_address(interface) if interface else None
    except ValueError:
        raise usage.UsageError(f"--listen={description!r}: interface={interface!r} is not an IP address") from None
    if address is not None and address.version != (4 if kind == "tcp" else 6):
        raise usage.UsageError(f"--listen={description!r}: interface={interface!r} is not an IPv{kind[3:] or 4} "
                               f"address")
    return interface, int(port_text), int(backlog_text)


RESCAN_INTERVAL = 300.0
LOAD_TIMESLICE = 0.002  # seconds of index loading per reactor turn
LOAD_BATCH = 50  # sidecars per step (~1 ms): a step cannot be cut short


class SyncThreads(service.Service):
    """
    The store's own threads for fdatasync: a slow disk then delays only other syncs, never the
    reactor's shared pool (hostname lookups, MP4 indexing).  Stopping waits for syncs in flight.
    """

    def __init__(self, size: int = 4, reactor: Any = None) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name="h264edge-sync")
        self.reactor = reactor

    def run(self, f: Callable[..., Any], *args: Any) -> "defer.Deferred[Any]":
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        return threads.deferToThreadPool(reactor, self.pool, f, *args)

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        # also when the reactor stops without stopping the services (an embedding app): the pool's
        # threads are not daemons, so a pool left running would keep the process from exiting
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        reactor.addSystemEventTrigger("during", "shutdown", self._stop_pool)

    def _stop_pool(self) -> None:
        if self.pool.started:
            self.pool.stop()

    def stopService(self) -> Any:
        self._stop_pool()
        return super().stopService()


class OriginProbe(service.Service):
    """
    At startup, asks each origin once (L{OriginClient.probe}) and logs whether it answers; at the
    end, closes the origin connections kept for reuse.
    """

    def __init__(self, origin: OriginClient, metrics: Optional[EdgeMetrics] = None) -> None:
        self.origin = origin
        self.metrics = metrics

    def startService(self) -> None:
        super().startService()
        d = defer.Deferred.fromCoroutine(self.origin.probe())
        d.addCallback(self._report)
        d.addErrback(lambda f: log.failure("origin probe failed", f))

    def stopService(self) -> Any:
        """The edge stops: its idle connections to origins close now, not when the process ends."""
        super().stopService()
        return self.origin.pool.closeCachedConnections()

    def _report(self, results: dict[str, str]) -> None:
        for base, result in results.items():
            if self.metrics is not None:
                self.metrics.origin_probed(base, result)
            if result.startswith("HTTP"):
                log.info("origin {base} answers ({result})", base=base, result=result)
            else:
                log.warn("origin {base} is {result}; misses will fail over or answer 502/504", base=base,
                         result=result)


class IndexLoader(service.Service):
    """
    Rebuilds the store's LRU index from disk in the background; the edge serves meanwhile.  With
    C{rescan_every} (several processes on one cache directory) it scans again at that interval, to
    learn the objects other processes created and keep the byte budget over all of them.
    """

    def __init__(self, store: SliceStore, rescan_every: Optional[float] = None, clock: Any = None) -> None:
        self.store = store
        self.rescan_every = rescan_every
        self.clock = clock
        self._task: Optional[task.CooperativeTask] = None
        self._coop: Optional[task.Cooperator] = None
        self._gc_thresholds = gc.get_threshold()
        self._frozen = False
        self._rescan: Optional[task.LoopingCall] = None
        self._scanning = False

    def startService(self) -> None:
        super().startService()
        d = self._scan()
        d.addCallback(lambda _: log.info("cache index loaded: {n} objects", n=len(self.store)))
        if self.rescan_every:
            self._rescan = task.LoopingCall(self._scan_again)
            if self.clock is not None:
                self._rescan.clock = self.clock
            self._rescan.start(self.rescan_every, now=False)

    def _scan(self) -> Any:
        # small steps: each blocks the reactor for a few ms, so requests are answered while it loads
        # no full collections while loading: each walks every entry loaded so far (40-80 ms at 100,000)
        self._gc_thresholds = gc.get_threshold()
        gc.set_threshold(self._gc_thresholds[0], self._gc_thresholds[1], 1_000_000)
        self._task = self._cooperator().cooperate(self.store.rebuild_steps(batch=LOAD_BATCH))
        self._scanning = True
        d = self._task.whenDone()
        d.addBoth(self._scanned)
        d.addErrback(lambda f: None if f.check(task.TaskStopped) else log.failure("index rebuild failed", f))
        return d

    def _cooperator(self) -> task.Cooperator:
        """
        Steps for at most ~2 ms per reactor turn (Twisted's global cooperator runs 10 ms slices:
        requests answered while 100,000 objects loaded waited ~13 ms at the median).
        """
        if self._coop is None:
            reactor = self.clock
            if reactor is None:
                from twisted.internet import reactor  # type: ignore[no-redef]

            def slice_of_2ms() -> Callable[[], bool]:
                end = time.monotonic() + LOAD_TIMESLICE
                return lambda: time.monotonic() >= end

            def schedule(work: Callable[[], None]) -> Any:
                return reactor.callLater(0, work)

            self._coop = task.Cooperator(terminationPredicateFactory=slice_of_2ms, scheduler=schedule)
        return self._coop

    def _scanned(self, result: Any) -> Any:
        self._scanning = False
        gc.set_threshold(*self._gc_thresholds)
        if not self._frozen:
            # The index is long-lived: keep the cyclic GC from walking it again and again (a full
            # collection over 100,000 entries paused the reactor for 40-80 ms).  Once only: rescans
            # do not freeze again (what is alive then and dies later in a cycle is never collected).
            # Not after a full collection, which is that pause again (10-20 ms even for an empty
            # cache, at startup, when the first viewers arrive): the young generations are
            # collected, and the cyclic garbage older than that (a few requests' worth, from while
            # the load ran) stays frozen.  Frozen objects are still freed by reference counting when
            # the index drops them.
            self._frozen = True
            gc.collect(1)
            gc.freeze()
        return result

    def _scan_again(self) -> None:
        if not self._scanning:
            self._scan()

    def scan_now(self) -> "defer.Deferred[Any]":
        """Scan the cache directory again now (or wait for the scan under way); fires when done."""
        if self._scanning and self._task is not None:
            return self._task.whenDone().addErrback(lambda _: None)
        return defer.maybeDeferred(self._scan)

    def stopService(self) -> Any:
        if self._rescan is not None and self._rescan.running:
            self._rescan.stop()
        if self._task is not None:
            try:
                self._task.stop()
            except (task.TaskDone, task.TaskFailed, task.TaskStopped):
                pass
        if self._coop is not None and self._coop.running:
            self._coop.stop()
        self.store.close()
        return super().stopService()


def quiet_hachoir() -> None:
    """hachoir prints warnings about odd bytes to stderr; a server reports errors as HTTP answers."""
    import hachoir.core.config

    hachoir.core.config.quiet = True


def origin_client(options: Options) -> OriginClient:
    """The origin client the options describe: origins, timeouts, health, retry budget, limits."""
    health = OriginHealth(
        [b if b.endswith("/") else b + "/" for b in options["origins"]], reactor_clock(),
        fall=options["origin-fall"], rise=options["origin-rise"], retry_after=options["origin-retry-after"],
        limit=options["origin-connections"],
    )
    return OriginClient(
        options["origins"], timeout=options["origin-timeout"], health=health,
        retry_budget=RetryBudget(reactor_clock(), ratio=options["origin-retry-budget"]),
        check_path=options["origin-check"], s3_origins=options["s3-origins"],
    )


def reactor_clock() -> Any:
    from twisted.internet import reactor

    return reactor


def check_paths(options: Options) -> None:
    """The directories and files the options name can be used (cache, logs, token); else L{StartupRefused}."""
    try:
        check_cache_dir(options["cache-dir"])
    except CacheDirUnusable as e:
        raise StartupRefused(f"h264edge: --cache-dir: {e}") from None
    for name in ("access-log", "event-log"):
        if options[name] not in ("", "off"):
            check_writable_file(name, options[name])
    admin_token(options)


def check_writable_file(name: str, path: str) -> None:
    """C{path} can be opened for appending (a log file); else L{StartupRefused}."""
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise StartupRefused(f"h264edge: --{name}={path}: cannot write there ({e.strerror})") from None


def admin_token(options: Any) -> Optional[str]:
    """The purge token of C{--admin-token} or of C{--admin-token-file} (read now), if any."""
    if options.get("admin-token-file") is None:
        token: Optional[str] = options.get("admin-token")
        return token
    path = options["admin-token-file"]
    try:
        token = read_token_file(path)
    except OSError as e:
        raise StartupRefused(f"h264edge: --admin-token-file={path}: {e.strerror}") from None
    if not TOKEN_CHARS.fullmatch(token):
        raise StartupRefused(f"h264edge: --admin-token-file={path}: its first line is not a token "
                             "(1-4096 letters, digits and -._~+/, then = only)")
    return token


def edge_metrics(options: Options, store: SliceStore, origin: OriginClient, site: EdgeSite,
                 resource: EdgeResource) -> EdgeMetrics:
    """The metrics of this process, told by the site, the origin client, the fill and the store."""
    multiprocess_dir = None
    if options["workers"] > 1 and options["listen-fd"] is None:
        multiprocess_dir = tempfile.mkdtemp(prefix="h264edge-metrics-")  # the workers inherit its name
    elif options["listen-fd"] is not None:
        multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics = EdgeMetrics(store, lambda: origin.bases, multiprocess_dir=multiprocess_dir,
                          collector=options["listen-fd"] is None)
    observe(metrics, store, origin, site, resource)
    return metrics


def observe(metrics: EdgeMetrics, store: SliceStore, origin: OriginClient, site: EdgeSite,
            resource: EdgeResource) -> None:
    """Have the site, the origin client, the fill and the store tell C{metrics} what they do."""
    site.metrics = metrics
    site.hot_tally = metrics.hot_tally
    metrics.connection_counts.append(site.drain.open)
    store.observer = origin.observer = resource.filler.observer = metrics
    resource.on_purge = metrics.purges


def listening_service(description: str, factory: Any, option: str = "listen") -> service.Service:
    """
    The service listening on C{description} for C{factory}; a C{systemd:} description whose socket
    systemd did not pass is refused with one line.
    """
    passed = {name: os.environ.get(name) for name in ("LISTEN_FDS", "LISTEN_FDNAMES")}  # Twisted consumes them
    try:
        endpoint = endpoints.serverFromString(_reactor(), description)
    except (IndexError, KeyError):
        why = "no sockets passed" if passed["LISTEN_FDS"] is None else (
            f"LISTEN_FDS={passed['LISTEN_FDS']} without LISTEN_FDNAMES (Twisted needs both; systemd sets "
            "both, systemd-socket-activate needs --fdname)" if passed["LISTEN_FDNAMES"] is None else
            f"LISTEN_FDS={passed['LISTEN_FDS']}, LISTEN_FDNAMES={passed['LISTEN_FDNAMES']}")
        raise StartupRefused(f"h264edge: --{option}={description}: no such socket from systemd ({why})") from None
    except Exception as e:
        raise StartupRefused(f"h264edge: --{option}={description}: {e}") from None
    svc = strports.StreamServerEndpointService(endpoint, factory)  # type: ignore[attr-defined]
    svc._raiseSynchronously = True  # a port in use fails the start, as twistd's strports do
    return svc


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class Reloader:
    """
    SIGHUP: read the options again (the same command line, the config file as it is now) and apply
    what can change while serving; log every change, and each one that needs a restart.

    @ivar appliers: option name -> function taking the new value, for the options that reload.
    """

    def __init__(self, options: Options) -> None:
        self.argv = list(options.raw_argv)
        if options["listen-fd"] is not None:
            self.argv.append(f"--listen-fd={options['listen-fd']}")
        self.current = dict(options)
        self.appliers: dict[str, Callable[[Any], None]] = {}
        self.always: list[Callable[[], None]] = []  # run on every reload that parses (files to read again)
        self.workers: Optional[WorkerPool] = None
        self.fresh: Any = options

    def on(self, name: str, apply: Callable[[Any], None]) -> None:
        self.appliers[name] = apply

    def reload(self) -> dict[str, str]:
        """Apply the options as they read now; C{{option: "applied" | "needs a restart"}} of what changed."""
        if self.workers is not None:
            forward_signal(_transports(self.workers), signal.SIGHUP)
        fresh = Options()
        try:
            fresh.parseOptions(self.argv)
            self.fresh = fresh
            for again in self.always:
                again()
        except (usage.UsageError, StartupRefused) as e:
            log.error("reload refused, nothing changed: {error}", error=str(e))
            return {}
        outcome: dict[str, str] = {}
        for name in sorted(set(fresh) | set(self.current)):
            old, new = self.current.get(name), fresh.get(name)
            if old == new or name in ("tcp-listen", "s3-origins"):
                continue
            apply = self.appliers.get(name)
            if apply is None:
                log.warn("reload: --{name} changed ({old!r} -> {new!r}) but needs a restart", name=name, old=old, new=new)
                outcome[name] = "needs a restart"
                continue
            try:
                apply(new)
            except NeedsRestart as e:
                log.warn("reload: --{name} changed ({old!r} -> {new!r}) but needs a restart: {why}", name=name,
                         old=old, new=new, why=str(e))
                outcome[name] = "needs a restart"
                continue
            except Exception:
                log.failure("reload: applying --{name} failed", name=name)
                outcome[name] = "failed"
                continue
            log.info("reload: --{name} {old!r} -> {new!r}", name=name, old=old, new=new)
            self.current[name] = new
            outcome[name] = "applied"
        if not outcome:
            log.info("reload: nothing changed")
        return outcome


class MetricsUpkeep(service.Service):
    """
    Moves the tallies into the metrics every second and, where the figures are served, samples the
    rates the status page charts; with --workers, the first process removes the shared metrics
    directory when it stops.
    """

    def __init__(self, metrics: EdgeMetrics, remove_dir: Optional[str] = None, clock: Any = None) -> None:
        self.metrics = metrics
        self.remove_dir = remove_dir
        self.clock = clock
        self._loops: list[task.LoopingCall] = []

    def startService(self) -> None:
        super().startService()
        calls = [(self.metrics.flush, 1.0)]
        if self.metrics.collector:
            calls.append((self.metrics.sample, HISTORY_STEP))
        for function, interval in calls:
            loop = task.LoopingCall(function)
            if self.clock is not None:
                loop.clock = self.clock
            loop.start(interval, now=True).addErrback(lambda f: log.failure("metrics upkeep failed", f))
            self._loops.append(loop)

    def stopService(self) -> Any:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        self.metrics.flush()
        if self.remove_dir is not None:
            shutil.rmtree(self.remove_dir, ignore_errors=True)
        return super().stopService()


class ReopenedFile:
    """A text file opened for appending, line-buffered, that L{reopen} opens again (logrotate moved it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "a", 1, encoding="utf-8")

    def write(self, text: str) -> int:
        return self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        old, self._file = self._file, open(self.path, "a", 1, encoding="utf-8")
        old.close()


class NeedsRestart(Exception):
    """An option changed in a way that cannot be applied while serving (the message says why)."""


def replace_origins(origin: OriginClient, bases: list[str]) -> None:
    """The origins of C{--origin} as a reload gives them (s3:// ones need a restart: their signers)."""
    bases = [b if b.endswith("/") else b + "/" for b in bases]
    if any(base.startswith("s3://") for base in [*origin.bases, *bases]):
        raise NeedsRestart("s3:// origins are set up at start")
    for base in bases:
        origin.health.states.setdefault(base, OriginState(base))
    origin.bases = bases


def _transports(pool: WorkerPool) -> list[Any]:
    return [worker.transport for worker in pool.workers.values() if worker.transport is not None]


def makeService(options: Options) -> service.MultiService:
    quiet_hachoir()
    check_paths(options)
    open_more_files()  # before the connection cap is taken from the limit (--max-connections=auto)
    access_log = options["access-log"]
    top = EdgeService(drain_timeout=options["drain-timeout"])
    sync_threads = SyncThreads()
    sync_threads.setServiceParent(top)  # first in, last out: stops after the store closed
    cache_dir = options["cache-dir"]
    try:
        store = SliceStore(
            cache_dir,
            max_size=options["max-size"],
            slice_size=options["slice-size"],
            sync=not options["no-sync"],
            run_in_thread=sync_threads.run,  # batches are fdatasync'ed off the reactor
            # several processes on one directory: a young unnamed data file may be another's fill
            orphan_grace=ORPHAN_GRACE if options["workers"] > 1 or options["listen-fd"] is not None else 0.0,
            min_free=min_free_bytes(options["min-free"], cache_dir),
            alone=options["workers"] <= 1 and options["listen-fd"] is None,
        )
    except CacheDirUnusable as e:
        raise StartupRefused(f"h264edge: --cache-dir: {e}") from None  # one line, exit status 1
    origin = origin_client(options)
    filler = Filler(store, origin, default_ttl=options["default-ttl"], idle_timeout=options["origin-idle-timeout"],
                    stale_if_error=options["stale-if-error"], store_set_cookie=options["cache-set-cookie"])
    shared = options["workers"] > 1 or options["listen-fd"] is not None
    if shared:  # one origin fetch per slice for all the processes on the directory
        filler.shared = FillLocks(options["cache-dir"])
    resource = EdgeResource(
        store,
        origin,
        default_ttl=options["default-ttl"],
        seek_cache_bytes=options["seek-cache"],
        max_moov=options["max-moov"],
        keep_query=not options["ignore-query"],
        pass_methods=options["pass-methods"],
        exact_seek=options["exact-seek"],
        hot_bytes=options["hot-cache"],
        filler=filler,
        name=options["name"],
        viewer_no_cache=options["viewer-no-cache"],
    )
    loader = IndexLoader(store, rescan_every=RESCAN_INTERVAL if shared else None)
    loader.setServiceParent(top)
    if options["origin-check"]:
        HealthChecks(origin.health, origin.check, options["origin-check-interval"]).setServiceParent(top)
    limits = ConnectionLimits(
        header_timeout=options["header-timeout"],
        idle_timeout=options["idle-timeout"],
        send_timeout=options["send-timeout"],
        max_connections=options["max-connections"],
        max_connections_per_ip=options["max-connections-per-ip"],
        max_body=options["max-body"],
    )
    root: Any = resource if options["no-player"] else ViewerRoot(resource, PlayerPage())
    site = EdgeSite(root, resource.hot, logPath=access_log if access_log not in ("", "off") else None,
                    limits=limits)
    site.access_log = access_log != "off"
    site.access_log_format = options["access-log-format"]
    site.displayTracebacks = False
    site.trusted_proxies = resource.purge_auth.trusted_proxies = parse_networks(options["trusted-proxies"])
    resource.purge_auth.token = admin_token(options)
    top.drains.append(site.drain)
    metrics = None
    event_file = ReopenedFile(options["event-log"]) if options["event-log"] else None
    if options["admin-listen"] or event_file is not None:
        metrics = edge_metrics(options, store, origin, site, resource)
        if event_file is not None:
            events: Any = jsonFileLogObserver(event_file, recordSeparator="")  # type: ignore[arg-type]
            metrics.event_log = Logger(namespace="h264edge.events", observer=events)
    if options["admin-listen"]:
        assert metrics is not None
        metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") if options["workers"] > 1 else None
        MetricsUpkeep(metrics, remove_dir=metrics_dir).setServiceParent(top)
        if options["listen-fd"] is None:  # a worker's figures are served by the first process
            admin = admin_site(admin_resource(resource, metrics, loader.scan_now if shared else None), limits)
            top.add_listener(listening_service(options["admin-listen"], admin, "admin-listen"),
                             f"--admin-listen={options['admin-listen']}")
    OriginProbe(origin, metrics).setServiceParent(top)

    reloader = Reloader(options)
    reloader.on("origins", functools.partial(replace_origins, origin))
    reloader.on("default-ttl", lambda ttl: setattr(resource.filler, "default_ttl", ttl))
    reloader.on("max-size", store.resize)
    reloader.on("drain-timeout", lambda seconds: setattr(top, "drain_timeout", seconds))

    def new_token(_: Any) -> None:
        resource.purge_auth.token = admin_token(reloader.fresh)

    reloader.on("admin-token", new_token)
    reloader.on("admin-token-file", new_token)
    reloader.always.append(lambda: new_token(None))  # the file's content may have changed, not its name

    def new_proxies(addresses: list[str]) -> None:
        site.trusted_proxies = resource.purge_auth.trusted_proxies = parse_networks(addresses)

    reloader.on("trusted-proxies", new_proxies)

    if options["listen-fd"] is not None:
        top.add_listener(InheritedPort(options["listen-fd"], site_naming_process(site)), "--listen-fd")
    elif options["workers"] > 1:
        interface, port, backlog = options["tcp-listen"]
        pool = WorkerPool(interface, port, site_naming_process(site), options.worker_argv(), options["workers"],
                          backlog=backlog)
        pool.stop_timeout = options["drain-timeout"] + STOP_TIMEOUT
        top.add_listener(pool, f"--listen={options['listen']}")
        reloader.workers = pool
    else:
        top.add_listener(listening_service(options["listen"], site), f"--listen={options['listen']}")

    reloader.on("access-log-format", lambda fmt: setattr(site, "access_log_format", fmt))
    policy = resource.throttle_policy = ThrottlePolicy(
        options["limit-rate"], options["limit-rate-after"], options["mp4-limit-rate"], options["mp4-limit-rate-after"],
        bitrate_of=resource.clip_bitrate)
    for name, field in (("limit-rate", "rate"), ("limit-rate-after", "rate_after"), ("mp4-limit-rate", "mp4_factor"),
                        ("mp4-limit-rate-after", "mp4_after")):
        reloader.on(name, functools.partial(setattr, policy, field))

    def reopen_logs() -> None:
        site.reopen_log()
        if event_file is not None:
            event_file.reopen()
        if reloader.workers is not None:
            forward_signal(_transports(reloader.workers), signal.SIGUSR1)
        log.info("log files reopened")

    SignalHandlers({signal.SIGUSR1: reopen_logs, signal.SIGHUP: reloader.reload}).setServiceParent(top)
    top.reloader = reloader  # type: ignore[attr-defined]
    top.resource = resource  # type: ignore[attr-defined]
    top.metrics = metrics  # type: ignore[attr-defined]
    return top
