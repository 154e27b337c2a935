# -*- test-case-name: tests.test_admin -*-
"""
What the origin client, the fill and the store tell an operator's counters.

Each of them holds an C{observer} (L{NULL_OBSERVER} unless one is set, e.g. by C{twistd h264edge}:
L{h264edge.metrics.EdgeMetrics}) and calls it in a few places, one line each.  Every method here does
nothing; an observer overrides what it counts.  Calls must be cheap and must not raise.
"""

from __future__ import annotations


class EdgeObserver:
    """Events of the fill, the origin client and the store; all no-ops here."""

    def origin_answered(self, base: str, code: int, seconds: float) -> None:
        """Origin C{base} answered a request with C{code} after C{seconds} (request to headers)."""

    def origin_failed(self, base: str, kind: str) -> None:
        """
        A request to C{base} (or a URL under it) failed: C{kind} is C{timeout}, C{connect} (could not
        connect or the connection dropped before an answer), C{status_5xx}, C{encoded} (a body encoded
        although identity was asked for) or C{body_cut} (a body that stopped before its end).
        """

    def origin_bytes(self, url: str, count: int) -> None:
        """C{count} body bytes arrived from the origin URL C{url}."""

    def fill_done(self, key: str, url: str, seconds: float) -> None:
        """A fetch of C{key} from C{url} wrote every slice it owned, C{seconds} after it began."""

    def fill_failed(self, key: str, why: str) -> None:
        """A fetch of C{key} gave up: its readers fail (C{why} is one line)."""

    def admitted(self, key: str, size: int) -> None:
        """A new object of C{size} bytes is kept in the cache."""

    def evicted(self, key: str, size: int) -> None:
        """An object holding C{size} bytes of the cache was evicted to stay under the size bound."""


NULL_OBSERVER = EdgeObserver()
