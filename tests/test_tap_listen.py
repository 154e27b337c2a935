"""
C{--workers} with every TCP --listen form (parsed by the edge itself: no private Twisted parser) and
the connection-limit options.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from h264edge.tap import IndexLoader, Options, OriginProbe, SyncThreads, makeService
from h264edge.web.limits import ConnectionLimits, default_max_connections


def options(*argv: str) -> Options:
    parsed = Options()
    parsed.parseOptions(["--origin=http://127.0.0.1:1/", "--cache-dir=/tmp/unused-h264edge", *argv])
    return parsed


class WorkersListenTests(SynchronousTestCase):
    def test_tcp_and_tcp6_forms(self) -> None:
        for listen, address in [
            ("tcp:8080", ("", 8080, 50)),
            ("tcp:8080:interface=127.0.0.1:backlog=100", ("127.0.0.1", 8080, 100)),
            ("tcp:port=8081:backlog=7", ("", 8081, 7)),
            ("tcp6:8080", ("::", 8080, 50)),
            ("tcp6:port=8080:interface=\\:\\:1", ("::1", 8080, 50)),
            ("tcp6:8080:200:\\:\\:1", ("::1", 8080, 200)),
            ("tcp6:8080:backlog=64:interface=\\:\\:", ("::", 8080, 64)),
        ]:
            self.assertEqual(options("--workers=2", f"--listen={listen}")["tcp-listen"], address, listen)

    def test_other_forms_are_usage_errors(self) -> None:
        for listen in ("ssl:443", "ssl:443:privateKey=k.pem", "unix:/run/x.sock", "tcp6:8080:backlog=x",
                       "tcp:8080:backlog=x", "tcp:99999", "tcp:http", "tcp6:8080:interface=127.0.0.1",
                       "tcp:8080:interface=localhost", "tcp:8080:reuse=1", "tcp:8080:1:2:3", "tcp:", "",
                       "tcp:8080:backlog=0"):
            self.assertRaises(usage.UsageError, options, "--workers=2", f"--listen={listen}")

    def test_one_process_leaves_listen_to_twisted(self) -> None:
        self.assertNotIn("tcp-listen", options("--listen=ssl:443"))

    def test_a_tcp6_pool(self) -> None:
        from h264edge.workers import WorkerPool

        built = makeService(options("--workers=2", "--listen=tcp6:0:interface=\\:\\:1:backlog=9",
                                    f"--cache-dir={self.mktemp()}"))
        [pool] = [s for s in built if isinstance(s, WorkerPool)]
        self.assertEqual((pool.interface, pool.requested_port, pool.backlog), ("::1", 0, 9))


class LimitOptionTests(SynchronousTestCase):
    def site(self, *argv: str) -> Any:
        built = makeService(options("--listen=tcp:0", f"--cache-dir={self.mktemp()}", *argv))
        [port] = [s for s in built if not isinstance(s, (IndexLoader, OriginProbe, SyncThreads))]
        return port.factory

    def test_defaults(self) -> None:
        site = self.site()
        self.assertEqual(site.limits, ConnectionLimits(header_timeout=10, idle_timeout=60, send_timeout=60,
                                                       max_connections=0, max_connections_per_ip=0,
                                                       max_body=2**20))
        self.assertEqual(site.max_connections, default_max_connections())

    def test_given(self) -> None:
        site = self.site("--header-timeout=2.5", "--idle-timeout=30", "--send-timeout=20", "--max-connections=500",
                         "--max-connections-per-ip=20", "--max-body=16M")
        self.assertEqual(site.limits, ConnectionLimits(header_timeout=2.5, idle_timeout=30, send_timeout=20,
                                                       max_connections=500, max_connections_per_ip=20,
                                                       max_body=16 * 2**20))
        self.assertEqual(site.max_connections, 500)

    def test_bad_values(self) -> None:
        for argv in (["--header-timeout=0"], ["--send-timeout=-1"], ["--idle-timeout=soon"], ["--max-connections=-5"],
                     ["--max-connections=many"], ["--max-connections-per-ip=auto"], ["--max-body=lots"],
                     ["--max-connections=\u0661"]):
            self.assertRaises(usage.UsageError, options, *argv)

    def test_help_documents_them(self) -> None:
        text = str(Options())
        for name in ("--header-timeout", "--idle-timeout", "--send-timeout", "--max-connections",
                     "--max-connections-per-ip", "--max-body"):
            self.assertIn(name, text)
