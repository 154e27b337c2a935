"""C{--config FILE}: TOML equivalent to every command-line option, the command line winning."""

from __future__ import annotations

import os

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from h264edge.config import ConfigError, config_arguments, config_path
from h264edge.tap import REPEATABLE, Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: a valid value of every option, as the command line and as TOML (a new option must be added here)
SAMPLES: dict[str, tuple[list[str], str]] = {
    "origin": (["--origin=http://a:8000/", "--origin=http://b/"], 'origin = ["http://a:8000/", "http://b/"]'),
    "pass-method": (["--pass-method=POST"], 'pass-method = ["POST"]'),
    "cache-dir": (["--cache-dir=/srv/cache"], 'cache-dir = "/srv/cache"'),
    "max-size": (["--max-size=50G"], 'max-size = "50G"'),
    "listen": (["--listen=tcp:8081"], 'listen = "tcp:8081"'),
    "slice-size": (["--slice-size=2M"], 'slice-size = "2M"'),
    "default-ttl": (["--default-ttl=60"], "default-ttl = 60"),
    "origin-timeout": (["--origin-timeout=2.5"], "origin-timeout = 2.5"),
    "seek-cache": (["--seek-cache=16M"], 'seek-cache = "16M"'),
    "max-moov": (["--max-moov=8M"], 'max-moov = "8M"'),
    "workers": (["--workers=2"], "workers = 2"),
    "hot-cache": (["--hot-cache=0"], "hot-cache = 0"),
    "access-log": (["--access-log=off"], 'access-log = "off"'),
    "access-log-format": (["--access-log-format=json"], 'access-log-format = "json"'),
    "event-log": (["--event-log=/var/log/h264edge/events.log"], 'event-log = "/var/log/h264edge/events.log"'),
    "drain-timeout": (["--drain-timeout=5"], "drain-timeout = 5"),
    "admin-listen": (["--admin-listen=tcp:9080"], 'admin-listen = "tcp:9080"'),
    "admin-token": (["--admin-token=abc"], 'admin-token = "abc"'),
    "admin-token-file": ([], ""),  # exclusive with admin-token: see test_admin_token_file
    "trusted-proxy": (["--trusted-proxy=10.0.0.0/8", "--trusted-proxy=::1"], 'trusted-proxy = ["10.0.0.0/8", "::1"]'),
    "ignore-query": (["--ignore-query"], "ignore-query = true"),
    "exact-seek": (["--exact-seek"], "exact-seek = true"),
    "no-sync": (["--no-sync"], "no-sync = true"),
    "min-free": (["--min-free=5%"], 'min-free = "5%"'),
    "stale-if-error": (["--stale-if-error=30"], "stale-if-error = 30"),
    "viewer-no-cache": (["--viewer-no-cache"], "viewer-no-cache = true"),
    "cache-set-cookie": (["--cache-set-cookie"], "cache-set-cookie = true"),
    "header-timeout": (["--header-timeout=5"], "header-timeout = 5"),
    "idle-timeout": (["--idle-timeout=30"], "idle-timeout = 30"),
    "send-timeout": (["--send-timeout=20"], "send-timeout = 20"),
    "max-connections": (["--max-connections=5000"], "max-connections = 5000"),
    "max-connections-per-ip": (["--max-connections-per-ip=8"], "max-connections-per-ip = 8"),
    "max-body": (["--max-body=64K"], 'max-body = "64K"'),
    "origin-idle-timeout": (["--origin-idle-timeout=20"], "origin-idle-timeout = 20"),
    "origin-retry-after": (["--origin-retry-after=2"], "origin-retry-after = 2"),
    "origin-retry-budget": (["--origin-retry-budget=0.5"], "origin-retry-budget = 0.5"),
    "origin-connections": (["--origin-connections=32"], "origin-connections = 32"),
    "origin-check": (["--origin-check=/health"], 'origin-check = "/health"'),
    "origin-check-interval": (["--origin-check-interval=3"], "origin-check-interval = 3"),
    "origin-rise": (["--origin-rise=3"], "origin-rise = 3"),
    "origin-fall": (["--origin-fall=5"], "origin-fall = 5"),
    "name": (["--name=edge-7"], 'name = "edge-7"'),
    "s3-endpoint": (["--s3-endpoint=http://s3.example:8333"], 's3-endpoint = "http://s3.example:8333"'),
    "s3-region": (["--s3-region=eu-west-1"], 's3-region = "eu-west-1"'),
    "s3-credentials": (["--s3-credentials=/etc/h264edge/aws"], 's3-credentials = "/etc/h264edge/aws"'),
    "s3-profile": (["--s3-profile=edge"], 's3-profile = "edge"'),
    "no-player": (["--no-player"], "no-player = true"),
    "limit-rate": (["--limit-rate=1M"], 'limit-rate = "1M"'),
    "limit-rate-after": (["--limit-rate-after=512K"], 'limit-rate-after = "512K"'),
    "mp4-limit-rate": (["--mp4-limit-rate=1.25"], "mp4-limit-rate = 1.25"),
    "mp4-limit-rate-after": (["--mp4-limit-rate-after=30"], "mp4-limit-rate-after = 30"),
}


def every_option() -> set[str]:
    options = Options()
    names = {str(p[0]) for p in options.optParameters} | {str(f[0]) for f in options.optFlags} | set(REPEATABLE)
    return names - {"config"}


class ConfigFileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_every_option_has_a_sample(self) -> None:
        self.assertEqual(set(SAMPLES), every_option())

    def test_the_file_is_equivalent_to_the_command_line_for_every_option(self) -> None:
        from_argv = self.parse(*[arg for argv, _ in SAMPLES.values() for arg in argv])
        from_file = self.parse(f"--config={self.write(chr(10).join(toml for _, toml in SAMPLES.values()))}")
        for name in ("config",):
            from_file.pop(name)
            from_argv.pop(name)
        self.assertEqual(dict(from_file), dict(from_argv))

    def test_admin_token_file(self) -> None:
        path = self.write('origin = ["http://o/"]\nadmin-token-file = "/etc/t"')
        self.assertEqual(self.parse(f"--config={path}")["admin-token-file"], "/etc/t")
        self.assertRaises(usage.UsageError, self.parse, f"--config={path}", "--admin-token=x")

    def test_underscored_keys_are_the_same_options(self) -> None:
        path = self.write('origin = ["http://o/"]\ncache_dir = "/c"')
        options = self.parse(f"--config={path}")
        self.assertEqual(options["cache-dir"], "/c")

    def test_the_command_line_wins(self) -> None:
        path = self.write('origin = ["http://file/"]\nmax-size = "1G"\npass-method = ["POST"]\nno-sync = true\n')
        options = self.parse("--max-size=2G", f"--config={path}", "--origin=http://cli/")
        self.assertEqual(options["max-size"], 2 * 2**30)
        self.assertEqual(options["origins"], ["http://cli/"])  # the command line's list replaces the file's
        self.assertEqual(options["pass-methods"], ["POST"])  # not given there: the file's
        self.assertTrue(options["no-sync"])

    def test_values_pass_the_command_line_checks(self) -> None:
        cases = {
            'origin = ["http://o/"]\nmax-size = "lots"': "--max-size: 'lots' is not a size",
            'origin = ["ftp://o/"]': "--origin='ftp://o/' must be an http://, https:// or s3:// URL",
            'origin = ["http://o/"]\norigin-timeout = -3': "--origin-timeout must be a non-negative number, not '-3'",
            'origin = ["http://o/"]\nlisten = 8080': "did you mean --listen=tcp:8080?",
        }
        for text, message in cases.items():
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(f"--config={self.write(text)}")
            self.assertIn(message, str(caught.exception))

    def test_unknown_keys_and_bad_shapes_name_the_key(self) -> None:
        cases = {
            'origin = ["http://o/"]\nmax_sise = "1G"': "no option is called 'max_sise' (did you mean 'max-size'?)",
            'origin = ["http://o/"]\nno-sync = "yes"': "no-sync is a switch: true or false",
            'origin = ["http://o/"]\nlisten = ["tcp:1", "tcp:2"]': "listen takes one value, not a list",
            'origin = ["http://o/"]\nmax-size = { a = 1 }': "max-size = {'a': 1} is not a string or a number",
            "origin = [": "not valid TOML",
        }
        for text, message in cases.items():
            path = self.write(text)
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(f"--config={path}")
            self.assertIn(f"--config={path}: {message}", str(caught.exception))

    def test_a_missing_file_is_one_line(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--config=/nonexistent/edge.toml")
        self.assertEqual(str(caught.exception), "--config=/nonexistent/edge.toml: No such file or directory")

    def test_the_shipped_example_is_valid_and_says_what_it_says(self) -> None:
        example = os.path.join(ROOT, "contrib", "h264edge.toml")
        options = self.parse(f"--config={example}")
        self.assertEqual(options["origins"], ["http://origin.example:8000/"])
        with open(example) as f:
            text = f.read()
        for name in every_option():  # every option is shown in it, commented out or not
            self.assertRegex(text, rf"(?m)^#? ?{name} = ", name)


class HelpersTests(SynchronousTestCase):
    def test_config_path_takes_the_last(self) -> None:
        self.assertEqual(config_path(["--config=a", "--x", "--config", "b"]), "b")
        self.assertIsNone(config_path(["--configure=a"]))

    def test_arguments_keep_the_order_of_the_file(self) -> None:
        self.assertEqual(
            config_arguments({"b": 1, "a": ["x", "y"], "f": True, "g": False}, "p", ["a", "b"], ["f", "g"], ["a"]),
            ["--b=1", "--a=x", "--a=y", "--f"],
        )

    def test_config_cannot_name_itself(self) -> None:
        self.assertRaises(ConfigError, config_arguments, {"config": "x"}, "p", ["config"], [], [])
