# -*- test-case-name: tests.test_plan -*-
"""
A response body is a *plan*: a sequence of parts, each literal bytes or a byte span of a cached object.

Every answer the edge gives (whole file, HTTP Range, MP4 seek, FLV seek, a Range over a seek) is a
Plan; the web layer hands it to one producer.  This module is pure: no Twisted, no I/O.
"""

from __future__ import annotations

from typing import Callable, Iterator, Union

import attrs
from attrs import frozen


@frozen
class Literal:
    """Bytes built in memory (box headers, rewritten tables, an FLV header)."""

    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)

    def cut(self, offset: int, length: int) -> "Literal":
        return Literal(self.data[offset : offset + length])


@frozen
class Span:
    """C{length} bytes of the object called C{key}, starting at byte C{offset} of that object."""

    key: str
    offset: int = attrs.field()
    length: int = attrs.field()

    @offset.validator
    def _check_offset(self, attribute: object, value: int) -> None:
        if value < 0:
            raise ValueError(f"negative span offset {value}")

    @length.validator
    def _check_length(self, attribute: object, value: int) -> None:
        if value < 0:
            raise ValueError(f"negative span length {value}")

    def cut(self, offset: int, length: int) -> "Span":
        return Span(self.key, self.offset + offset, length)


Part = Union[Literal, Span]
ReadFunction = Callable[[str, int, int], bytes]


def _normalise(parts: tuple[Part, ...] | list[Part]) -> tuple[Part, ...]:
    """Drop empty parts and merge neighbours that continue each other."""
    out: list[Part] = []
    for part in parts:
        if part.length == 0:
            continue
        if out:
            last = out[-1]
            if isinstance(last, Literal) and isinstance(part, Literal):
                out[-1] = Literal(last.data + part.data)
                continue
            if (
                isinstance(last, Span)
                and isinstance(part, Span)
                and last.key == part.key
                and last.offset + last.length == part.offset
            ):
                out[-1] = Span(last.key, last.offset, last.length + part.length)
                continue
        out.append(part)
    return tuple(out)


@frozen
class Plan:
    """An ordered list of parts; its length is known without reading any byte."""

    parts: tuple[Part, ...] = attrs.field(converter=_normalise)

    @classmethod
    def whole(cls, key: str, size: int) -> "Plan":
        return cls((Span(key, 0, size),))

    @property
    def length(self) -> int:
        return sum(part.length for part in self.parts)

    def slice(self, first: int, last: int) -> "Plan":
        """
        The bytes C{first} through C{last} inclusive (HTTP Range semantics), clamped to the plan.

        @raise ValueError: if C{first} is past the end or C{last < first}.
        """
        length = self.length
        if first < 0 or first >= length or last < first:
            raise ValueError(f"range {first}-{last} does not overlap a plan of {length} bytes")
        last = min(last, length - 1)
        out: list[Part] = []
        position = 0
        for part in self.parts:
            part_end = position + part.length  # exclusive
            if part_end > first and position <= last:
                start_in = max(first - position, 0)
                end_in = min(last + 1, part_end) - position
                out.append(part.cut(start_in, end_in - start_in))
            position = part_end
            if position > last:
                break
        return Plan(tuple(out))

    def spans(self) -> Iterator[Span]:
        for part in self.parts:
            if isinstance(part, Span):
                yield part

    def spans_end(self, key: str) -> int:
        """How far into object C{key} the plan reaches: the end (exclusive) of its last byte there, 0 if none."""
        return max((span.offset + span.length for span in self.spans() if span.key == key), default=0)

    def render(self, read: ReadFunction) -> bytes:
        """Materialise the plan with C{read(key, offset, length)}; for tests and small answers."""
        chunks = []
        for part in self.parts:
            if isinstance(part, Literal):
                chunks.append(part.data)
            else:
                chunks.append(read(part.key, part.offset, part.length))
        return b"".join(chunks)

