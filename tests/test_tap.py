"""The twistd plugin: options, sizes, the service graph, plugin discovery."""

import os
import subprocess
import sys
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from h264edge.lifecycle import SignalHandlers
from h264edge.tap import IndexLoader, Options, OriginProbe, SyncThreads, makeService, parse_min_free, parse_size
from tests.smallfs import mount_tmpfs, unwritable_dir


class SizeTests(SynchronousTestCase):
    def test_suffixes_are_powers_of_1024(self) -> None:
        self.assertEqual(parse_size("512"), 512)
        self.assertEqual(parse_size("64K"), 64 * 1024)
        self.assertEqual(parse_size("1.5M"), 3 * 2**19)
        self.assertEqual(parse_size("50G"), 50 * 2**30)
        self.assertEqual(parse_size("2t"), 2 * 2**40)
        self.assertEqual(parse_size("10GiB"), 10 * 2**30)

    def test_bad_sizes_are_usage_errors(self) -> None:
        for bad in ("", "G", "-1G", "10X", "ten"):
            self.assertRaises(usage.UsageError, parse_size, bad)


class OptionsTests(SynchronousTestCase):
    def test_origin_is_required(self) -> None:
        self.assertRaises(usage.UsageError, Options().parseOptions, [])

    def test_several_origins_in_order_and_sizes(self) -> None:
        options = Options()
        options.parseOptions(["--origin=http://a:8000/", "--origin", "http://b/", "--max-size=50G",
                              "--cache-dir=/tmp/x", "--listen=tcp:0", "--pass-method=post",
                              "--pass-method=DELETE", "--ignore-query"])
        self.assertEqual(options["origins"], ["http://a:8000/", "http://b/"])
        self.assertEqual(options["max-size"], 50 * 2**30)
        self.assertEqual(options["slice-size"], 2**20)
        self.assertEqual(options["pass-methods"], ["POST", "DELETE"])
        self.assertTrue(options["ignore-query"])

    def test_bad_values_are_usage_errors(self) -> None:
        for argv in (["--origin=ftp://x/"], ["--origin=http://x/", "--max-size=lots"],
                     ["--origin=http://x/", "--default-ttl=soon"], ["--origin=http://x/", "--slice-size=1K"],
                     ["--origin=http://x/", "--pass-method=GE T"], ["--origin=http://x/", "--pass-method=A(B)"],
                     ["--origin=http://x/", "--stale-if-error=later"]):
            self.assertRaises(usage.UsageError, Options().parseOptions, argv)

    def test_method_tokens_may_hold_dashes(self) -> None:
        """RFC 9110 §9.1, §5.6.2: a method is a token; M-SEARCH is one."""
        options = Options()
        options.parseOptions(["--origin=http://a/", "--pass-method=M-SEARCH", "--pass-method=x.y"])
        self.assertEqual(options["pass-methods"], ["M-SEARCH", "X.Y"])

    def test_http_cache_options(self) -> None:
        options = Options()
        options.parseOptions(["--origin=http://a/"])
        self.assertEqual((options["viewer-no-cache"], options["cache-set-cookie"], options["stale-if-error"]),
                         (False, False, 86400.0))
        options = Options()
        options.parseOptions(["--origin=http://a/", "--viewer-no-cache", "--cache-set-cookie", "--stale-if-error=60"])
        self.assertEqual((options["viewer-no-cache"], options["cache-set-cookie"], options["stale-if-error"]),
                         (True, True, 60.0))

    def test_help_documents_every_option(self) -> None:
        text = str(Options())
        for name in ("--origin", "--cache-dir", "--max-size", "--listen", "--slice-size", "--default-ttl",
                     "--origin-timeout", "--seek-cache", "--max-moov", "--ignore-query", "--exact-seek",
                     "--pass-method", "--no-sync", "--workers", "--hot-cache", "--access-log", "--min-free",
                     "--viewer-no-cache", "--cache-set-cookie", "--stale-if-error"):
            self.assertIn(name, text)


class MinFreeTests(SynchronousTestCase):
    def test_a_size_a_percentage_or_auto(self) -> None:
        self.assertEqual(parse_min_free("auto"), None)
        self.assertEqual(parse_min_free("2G"), 2 * 2**30)
        self.assertEqual(parse_min_free("0"), 0)
        self.assertEqual(parse_min_free("5%"), 0.05)
        self.assertEqual(parse_min_free("12.5%"), 0.125)
        for bad in ("100%", "-1%", "5 percent", "lots", "%", "1e3%"):
            self.assertRaises(usage.UsageError, parse_min_free, bad)

    def test_the_floor_reaches_the_store(self) -> None:
        disk = mount_tmpfs(self, "8m")
        for value, floor in (("auto", 8 * 2**20 // 20), ("25%", 2 * 2**20), ("1M", 2**20), ("0", 0)):
            options = Options()
            options.parseOptions(["--origin=http://127.0.0.1:1/", f"--cache-dir={disk}/c", "--listen=tcp:0",
                                  f"--min-free={value}"])
            [loader] = [s for s in makeService(options) if isinstance(s, IndexLoader)]
            self.assertEqual(loader.store.min_free, floor, value)
        options = Options()
        options.parseOptions(["--origin=http://127.0.0.1:1/", f"--cache-dir={self.mktemp()}"])
        [loader] = [s for s in makeService(options) if isinstance(s, IndexLoader)]
        self.assertLessEqual(loader.store.min_free, 2**30)  # auto on a big disk: 1G (5% of a small one)


class CacheDirTests(SynchronousTestCase):
    def test_an_unwritable_cache_dir_stops_twistd_with_one_line(self) -> None:
        cache_dir = unwritable_dir(self)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "h264edge", "--origin=http://127.0.0.1:1/", f"--cache-dir={cache_dir}", "--listen=tcp:0"],
            capture_output=True, text=True, env=env, timeout=60,
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn(cache_dir, lines[0])
        self.assertIn("not usable", lines[0])
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_a_cache_dir_that_is_a_file_stops_make_service(self) -> None:
        path = self.mktemp()
        with open(path, "w"):
            pass
        options = Options()
        options.parseOptions(["--origin=http://127.0.0.1:1/", f"--cache-dir={path}", "--listen=tcp:0"])
        error = self.assertRaises(SystemExit, makeService, options)
        self.assertIn(path, str(error))


class ServiceTests(SynchronousTestCase):
    def test_make_service_builds_loader_and_site(self) -> None:
        options = Options()
        options.parseOptions(["--origin=http://127.0.0.1:1/", f"--cache-dir={self.mktemp()}", "--listen=tcp:0"])
        top = makeService(options)
        self.assertTrue(IServiceCollection.providedBy(top))
        # sync threads, index loader, origin probe, the listening port, the signal handlers
        self.assertEqual(len(list(top)), 5)

    def site_of(self, *argv: str) -> Any:
        from h264edge.web.hot import EdgeSite

        options = Options()
        options.parseOptions(["--origin=http://127.0.0.1:1/", f"--cache-dir={self.mktemp()}", *argv])
        [port] = [s for s in makeService(options)
                  if not isinstance(s, (IndexLoader, OriginProbe, SyncThreads, SignalHandlers))]
        site = port.factory
        self.assertIsInstance(site, EdgeSite)
        return site

    def test_http_cache_options_reach_the_filler(self) -> None:
        site = self.site_of("--stale-if-error=60", "--cache-set-cookie", "--viewer-no-cache")
        edge = getattr(site.resource, "edge", site.resource)  # under the player page's root
        filler = edge.filler
        self.assertEqual((filler.stale_if_error, filler.store_set_cookie, edge.viewer_no_cache),
                         (60.0, True, True))

    def test_hot_cache_and_access_log(self) -> None:
        site = self.site_of()
        self.assertEqual((site.hot.max_bytes, site.access_log, site.logPath), (64 * 2**20, True, None))
        site = self.site_of("--hot-cache=0", "--access-log=off")
        self.assertEqual((site.hot, site.access_log), (None, False))
        path = self.mktemp()
        site = self.site_of("--hot-cache=1M", f"--access-log={path}")
        self.assertEqual((site.hot.max_bytes, site.access_log, site.logPath), (2**20, True, os.path.abspath(path)))

    def test_workers_build_a_pool_on_the_tcp_address(self) -> None:
        from h264edge.workers import WorkerPool

        options = Options()
        options.parseOptions(["--origin=http://127.0.0.1:1/", f"--cache-dir={self.mktemp()}", "--workers=3",
                              "--listen=tcp:8080:interface=127.0.0.1"])
        pool = [s for s in makeService(options) if isinstance(s, WorkerPool)]
        self.assertEqual(len(pool), 1)
        self.assertEqual((pool[0].interface, pool[0].requested_port, pool[0].count), ("127.0.0.1", 8080, 3))

    def test_a_worker_serves_the_inherited_descriptor(self) -> None:
        from h264edge.workers import InheritedPort

        options = Options()
        options.parseOptions(["--origin=http://127.0.0.1:1/", f"--cache-dir={self.mktemp()}", "--listen-fd=3"])
        ports = [s for s in makeService(options) if isinstance(s, InheritedPort)]
        self.assertEqual([p.fd for p in ports], [3])


class PluginTests(SynchronousTestCase):
    def test_twistd_finds_the_plugin(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "h264edge", "--help"],
            capture_output=True, text=True, env=env, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--origin", result.stdout)


class IndexLoaderTests(SynchronousTestCase):
    def test_loads_in_slices_on_the_given_clock_and_orders_by_last_use(self) -> None:
        from twisted.internet.task import Clock

        from h264edge.store import ObjectMeta, SliceStore

        root = self.mktemp()
        now = [1000.0]
        store = SliceStore(root, max_size=1 << 30, sync=False, now=lambda: now[0])
        for i in range(300):
            now[0] += 1
            meta = ObjectMeta(key=f"/{(i * 7) % 300}", size=3, etag=None, last_modified=None,
                              content_type="x", fetched_at=now[0], expires_at=now[0] + 60)
            obj = store.create(meta)
            obj.write(0, b"abc")
            obj.commit_slice(0)
            obj.close()
        store.close()
        clock = Clock()
        loaded = SliceStore(root, max_size=1 << 30, sync=False)
        loader = IndexLoader(loaded, clock=clock)
        loader.startService()
        turns = 0
        while loaded.loading and turns < 10_000:  # bounded
            clock.advance(0)
            turns += 1
        self.assertFalse(loaded.loading)
        self.assertEqual(loaded.keys_lru(), [f"/{(i * 7) % 300}" for i in range(300)])
        loader.stopService()
