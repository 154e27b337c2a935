# -*- test-case-name: tests.test_edge -*-
"""The seams of h264edge: an origin may be an HTTP server, an S3-compatible store or a parent edge."""

from __future__ import annotations

from zope.interface import Interface


class IOrigin(Interface):
    """Where objects come from on a miss."""

    async def fetch(path, first=0, last=None, conditional=None, method="GET"):  # type: ignore[no-untyped-def]
        """
        Ask for bytes C{first}..C{last} (inclusive, None = to the end) of C{path}.

        @return: an L{h264edge.origin.OriginReply} with the body unread.
        @raise h264edge.errors.OriginUnavailable: no origin could answer.
        @raise h264edge.errors.OriginStatus: the origin's final 4xx answer.
        """

    async def forward(method, path, headers, body):  # type: ignore[no-untyped-def]
        """Pass a non-GET method through, uncached; returns a treq response."""
