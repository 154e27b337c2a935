"""
The README's option tables against the code: every option of C{twistd h264edge} (L{tap.Options})
and of the C{h264edge} commands (their argparse parsers) has a row with its true default, and
every row names an option that exists.
"""

from __future__ import annotations

import argparse
import re
import socket
from pathlib import Path
from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase

from h264edge import cli, prewarm, tap

README = Path(__file__).resolve().parent.parent / "README.md"

#: options whose default is worked out at start, and what the README says of it
DYNAMIC_DEFAULTS = {"name": "the host name"}
#: long options of twistd h264edge that are not options of the edge (usage.Options' own)
NOT_EDGE_OPTIONS = {"help", "version"}

_OPTION = re.compile(r"`(--?[A-Za-z0-9][A-Za-z0-9-]*)")


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of each row of the Markdown table whose header line is C{header}."""
    lines = text.splitlines()
    start = lines.index(header) + 2  # the header and its |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def server_table(text: str) -> dict[str, tuple[list[str], str]]:
    """The server's options table: long name -> (every option the first cell names, default cell)."""
    table = {}
    for cells in table_rows(text, "| option | default | meaning |"):
        names = _OPTION.findall(cells[0])
        table[names[0].removeprefix("--")] = (names, cells[1])
    return table


def command_table(text: str) -> dict[tuple[str, str], str]:
    """The commands' options table: (command, long option) -> default cell."""
    table = {}
    for cells in table_rows(text, "| command | option | default | meaning |"):
        table[(cells[0].strip("`"), cells[1].strip("`"))] = cells[2]
    return table


def server_options() -> dict[str, tuple[Optional[str], Any]]:
    """Every long option C{twistd h264edge --help} lists: name -> (short letter or None, default)."""
    options = tap.Options()
    shorts = {long: short for short, long in options.synonyms.items() if len(short) == 1}
    found = {}
    for long in options.longOpt:
        name = long.rstrip("=")
        if name in NOT_EDGE_OPTIONS:
            continue
        flag = not long.endswith("=")
        found[name] = (shorts.get(name), False if flag else options.defaults.get(name))
    return found


def command_options() -> dict[tuple[str, str], Any]:
    """(command, long option) -> default, for the commands with options of their own."""
    found = {}
    parsers: dict[str, argparse.ArgumentParser] = {
        "demo": cli.demo_parser(), "prewarm": prewarm.prewarm_parser(), "purge": prewarm.purge_parser(),
    }
    for command, parser in parsers.items():
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            if longs:
                default = "(required)" if action.required else action.default
                found[(command, longs[0])] = False if isinstance(action, argparse._StoreTrueAction) else default
    return found


def default_problem(default: Any, cell: str) -> Optional[str]:
    """Why the README's default C{cell} does not say C{default}; None when it does."""
    if default is False:  # a flag
        return None if cell == "off" else f"a flag's default is off, not {cell}"
    if default == "(required)":
        return None if cell == "(required)" else f"required, not {cell}"
    if default is None or default == "" or default == []:
        return None if not cell.startswith("`") else f"no default, but {cell}"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return None if cell.startswith(f"`{default}`") else f"default `{default}`, not {cell}"


class ServerOptionsTableTests(SynchronousTestCase):
    """The README's table of C{twistd h264edge} options (the one under "Running it for real")."""

    def test_every_option_has_a_row(self) -> None:
        """Each long option of L{tap.Options} (and its short letter) is in the table."""
        table = server_table(README.read_text())
        missing = [name for name in server_options() if name not in table]
        self.assertEqual(missing, [])
        for name, (short, _) in server_options().items():
            if short is not None:
                self.assertIn(f"-{short}", table[name][0], name)

    def test_every_row_is_an_option(self) -> None:
        """No row names an option that does not exist (any more)."""
        options = server_options()
        self.assertEqual([name for name in server_table(README.read_text()) if name not in options], [])

    def test_defaults_are_the_code_s(self) -> None:
        """Each row's default is the option's: the value itself, C{off} for a flag, no value for none."""
        table = server_table(README.read_text())
        problems = {}
        for name, (_, default) in server_options().items():
            if name not in table:
                continue  # test_every_option_has_a_row says so
            cell = table[name][1]
            if name in DYNAMIC_DEFAULTS:
                problem = None if cell == DYNAMIC_DEFAULTS[name] else f"{DYNAMIC_DEFAULTS[name]}, not {cell}"
            else:
                problem = default_problem(default, cell)
            if problem is not None:
                problems[name] = problem
        self.assertEqual(problems, {})

    def test_the_host_name_is_the_name_default(self) -> None:
        """The one default the README cannot spell out is what it says it is."""
        self.assertEqual(server_options()["name"][1], socket.gethostname())

    def test_a_missing_row_is_found(self) -> None:
        """The table parser sees a row go (so the tests above can fail)."""
        text = README.read_text()
        row = next(line for line in text.splitlines() if line.startswith("| `--max-body` |"))
        table = server_table(text.replace(row + "\n", ""))
        self.assertEqual([name for name in server_options() if name not in table], ["max-body"])

    def test_a_wrong_default_is_found(self) -> None:
        self.assertIsNotNone(default_problem("10G", "`1G`"))
        self.assertIsNotNone(default_problem(False, "`on`"))
        self.assertIsNotNone(default_problem("", "`default`"))
        self.assertIsNone(default_problem(60.0, "`60`"))


class CommandOptionsTableTests(SynchronousTestCase):
    """The README's table of the options of C{h264edge demo}, C{prewarm} and C{purge}."""

    def test_every_option_has_a_row(self) -> None:
        table = command_table(README.read_text())
        self.assertEqual([key for key in command_options() if key not in table], [])

    def test_every_row_is_an_option(self) -> None:
        options = command_options()
        self.assertEqual([key for key in command_table(README.read_text()) if key not in options], [])

    def test_defaults_are_the_code_s(self) -> None:
        table = command_table(README.read_text())
        problems = {key: default_problem(default, table[key]) for key, default in command_options().items()
                    if key in table and default_problem(default, table[key]) is not None}
        self.assertEqual(problems, {})
