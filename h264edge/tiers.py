# -*- test-case-name: tests.test_tiers -*-
"""
Edges in tiers (a child edge whose origin is a parent h264edge): C{Via} and RFC 9211 C{Cache-Status}
chains, and loop protection.

Each edge has a name (C{--name}).  It adds C{1.1 NAME} to the C{Via} of the requests it sends to its
origin (after the C{Via} of the viewer request that caused the fetch, so a loop shows up) and of
the answers it sends, and adds its member to C{Cache-Status} after those of the caches nearer the
origin (RFC 9211 2: the first member is the cache closest to the origin server), e.g.
C{h264edge-parent; hit, h264edge-child; fwd=uri-miss}.  A request whose C{Via} already
names this edge has gone round in a circle and is answered 508 (Loop Detected).
"""

from __future__ import annotations

import re
from typing import Optional

#: a token (RFC 9110 5.6.2) that may also hold ':' for host:port names
_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z:]{1,64}$")
_VIA_MEMBER = re.compile(r"^\s*(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}/)?[0-9A-Za-z.]{1,16}\s+([^\s,()]{1,255})")
MAX_VIA = 8192


class BadEdgeName(ValueError):
    """An edge name that cannot be a Via received-by or a Cache-Status token."""


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise BadEdgeName(f"{name!r}: an edge name is 1-64 letters, digits and -._~:!#$%&'*+^`|")
    return name


def via_names(values: list[str]) -> list[str]:
    """The received-by names of C{Via} header values (members that do not parse are skipped)."""
    names = []
    text = ",".join(values)[:MAX_VIA]
    for member in text.split(","):
        match = _VIA_MEMBER.match(member)
        if match:
            names.append(match.group(1))
    return names


def is_loop(name: str, via_values: list[str]) -> bool:
    """Whether a request with these C{Via} values already passed through the edge called C{name}."""
    return name in via_names(via_values)


def via_onward(name: str, via_values: list[str]) -> str:
    """The C{Via} to send on (towards the origin, or to the viewer): what came, then us."""
    came = ", ".join(v.strip() for v in via_values if v.strip())[:MAX_VIA]
    return f"{came}, 1.1 {name}" if came else f"1.1 {name}"


def cache_status(name: str, x_cache: str, upstream: Optional[str] = None) -> str:
    """
    This edge's C{Cache-Status} member, after C{upstream}'s members: C{hit} for X-Cache HIT (and
    STALE: served from the store), C{fwd=partial} for PARTIAL, C{fwd=stale; fwd-status=304} for
    REVALIDATED, C{fwd=uri-miss} for MISS and BYPASS.
    """
    if x_cache in ("HIT", "STALE"):
        member = f"{name}; hit"
    elif x_cache == "PARTIAL":
        member = f"{name}; fwd=partial"
    elif x_cache == "REVALIDATED":
        member = f"{name}; fwd=stale; fwd-status=304"
    else:
        member = f"{name}; fwd=uri-miss"
    upstream = (upstream or "").strip()[:MAX_VIA]
    return f"{upstream}, {member}" if upstream else member
