# -*- test-case-name: tests.test_config -*-
"""
C{--config FILE}: the command-line options of C{twistd h264edge} as a TOML file.

Each key is an option's long name without its dashes (C{cache-dir}, or C{cache_dir}); a value is a
string, a number, a boolean (flags: C{true} sets them), or, for the options that may be repeated
(C{origin}, C{pass-method}, C{trusted-proxy}), a list.  The file is turned into command-line
arguments that go before the real ones, so every value passes the same checks as on the command
line, and the command line wins: a single-valued option given there overrides the file's, and a
repeatable one given there replaces the file's whole list.
"""

from __future__ import annotations

import difflib
import tomllib
from typing import Any, Iterable, Sequence


class ConfigError(Exception):
    """The config file cannot be read or holds a key or value no option takes (one line)."""


def load_config(path: str) -> dict[str, Any]:
    """The TOML table in C{path}."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config={path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config={path}: not valid TOML: {e}") from None


def config_arguments(
    table: dict[str, Any],
    path: str,
    parameters: Iterable[str],
    flags: Iterable[str],
    repeatable: Iterable[str],
    given: Sequence[str] = (),
) -> list[str]:
    """
    The command-line arguments that say what C{table} says, less the repeatable options that the
    command line C{given} names (there, the command line's list replaces the file's).

    @param parameters: long names of options that take a value.
    @param flags: long names of options without a value.
    @param repeatable: long names among C{parameters} that may be given several times.
    """
    parameters, flags, repeatable = set(parameters), set(flags), set(repeatable)
    known = parameters | flags
    arguments: list[str] = []
    for raw_key, value in table.items():
        key = raw_key.replace("_", "-")
        if key not in known or key == "config":
            close = difflib.get_close_matches(key, sorted(known - {"config"}), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--config={path}: no option is called {raw_key!r}{hint}")
        if key in flags:
            if not isinstance(value, bool):
                raise ConfigError(f"--config={path}: {raw_key} is a switch: true or false, not {value!r}")
            if value:
                arguments.append(f"--{key}")
            continue
        if key in repeatable and _given(key, given):
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and key not in repeatable:
            raise ConfigError(f"--config={path}: {raw_key} takes one value, not a list")
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise ConfigError(f"--config={path}: {raw_key} = {item!r} is not a string or a number")
            arguments.append(f"--{key}={item}")
    return arguments


def _given(key: str, argv: Sequence[str]) -> bool:
    return any(arg == f"--{key}" or arg.startswith(f"--{key}=") for arg in argv)


def config_path(argv: Sequence[str]) -> str | None:
    """The last C{--config} named in C{argv} (C{--config=FILE} or C{--config FILE}), if any."""
    found = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            found = arg.partition("=")[2]
        elif arg == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
    return found
