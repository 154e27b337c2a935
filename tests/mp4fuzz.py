"""
A seeded, structure-aware mutator of MP4 files (hostile media at the origin), shared by the bounded
tests in L{tests.test_adversarial} and the long loop in C{dev/fuzz-mp4}.

Each mutation knows the box tree: it changes a box's size, a table's entry count or one of its
entries to an extreme value, truncates the file, empties a track's sample tables consistently,
rewrites stco as co64 with an entry out of range, or breaks an edit list, as an origin serving a
broken or hostile file would.  C{mutate(data, rng)} returns the mutated file and a short label.
"""

from __future__ import annotations

import random
import struct
from typing import Callable, Iterator

CONTAINERS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"udta", b"mvex"})
#: table box -> (bytes of its fixed part after the full-box header, bytes per entry)
TABLES: dict[bytes, tuple[int, int]] = {
    b"stts": (4, 8), b"ctts": (4, 8), b"stss": (4, 4), b"stsc": (4, 12), b"stco": (4, 4),
    b"co64": (4, 8), b"stsz": (8, 4), b"elst": (4, 12),
}
EXTREMES = (0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)


class Box:
    """One box of the tree: its type, where its header starts, its size and its path of ancestors."""

    def __init__(self, type_: bytes, offset: int, size: int, header: int, parents: tuple["Box", ...]) -> None:
        self.type, self.offset, self.size, self.header, self.parents = type_, offset, size, header, parents

    @property
    def body(self) -> int:
        return self.offset + self.header


def boxes(data: bytes, start: int = 0, end: int | None = None, parents: tuple[Box, ...] = ()) -> Iterator[Box]:
    """Every box of a well-formed file, depth first (stops quietly where the file stops making sense)."""
    end = len(data) if end is None else end
    offset = start
    while offset + 8 <= end:
        size, type_ = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1 and offset + 16 <= end:
            (size,) = struct.unpack_from(">Q", data, offset + 8)
            header = 16
        elif size == 0:
            size = end - offset
        if size < header or offset + size > end:
            return
        box = Box(type_, offset, size, header, parents)
        yield box
        if type_ in CONTAINERS:
            yield from boxes(data, offset + header, offset + size, parents + (box,))
        offset += size


def _inside(box: Box, ancestor: Box) -> bool:
    return any(parent.offset == ancestor.offset for parent in box.parents)


def _u32(data: bytearray, at: int, value: int) -> None:
    struct.pack_into(">I", data, at, value & 0xFFFFFFFF)


def _extreme(rng: random.Random, old: int) -> int:
    return rng.choice(EXTREMES + (old + 1, max(0, old - 1), old * 2, rng.getrandbits(32)))


def _tables(data: bytes) -> list[Box]:
    return [box for box in boxes(data) if box.type in TABLES]


def box_size(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A box's 32-bit size set to a lie (0, 1, under its header, a byte off, past the end, random)."""
    box = rng.choice(list(boxes(data)))
    out = bytearray(data)
    value = rng.choice((0, 1, 7, 8, box.size - 1, box.size + 1, box.size + 4096, 0xFFFFFFFF, rng.getrandbits(32)))
    _u32(out, box.offset, value)
    return bytes(out), f"size of {box.type.decode('latin-1')}@{box.offset} {box.size}->{value}"


def huge_largesize(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A top-level box whose 64-bit size is huge (the 8 bytes after the type are taken as largesize)."""
    top = [box for box in boxes(data) if not box.parents and box.size >= 16]
    box = rng.choice(top)
    out = bytearray(data)
    _u32(out, box.offset, 1)
    struct.pack_into(">Q", out, box.offset + 8, rng.choice((2**63 - 1, 2**40, box.size + 1, 16, 15)))
    return bytes(out), f"largesize of {box.type.decode('latin-1')}@{box.offset}"


def truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """The file cut short: inside a box's header, its tables, or the sample data."""
    cut = rng.choice([rng.randrange(1, len(data)), rng.choice(list(boxes(data))).offset + rng.randrange(0, 24)])
    cut = max(1, min(cut, len(data) - 1))
    return data[:cut], f"truncated at {cut} of {len(data)}"


def _set_extreme(data: bytes, at: int, rng: random.Random) -> tuple[bytes, int, int]:
    """C{data} with the 32-bit field at C{at} set to an extreme value; the old and new values."""
    (old,) = struct.unpack_from(">I", data, at)
    value = _extreme(rng, old)
    out = bytearray(data)
    _u32(out, at, value)
    return bytes(out), old, value


def entry_count(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A table's entry count that disagrees with its size or with the other tables."""
    box = rng.choice(_tables(data))
    fixed, _ = TABLES[box.type]
    at = box.body + 4 + fixed - 4  # the count is the fixed part's last field
    out, old, value = _set_extreme(data, at, rng)
    return out, f"count of {box.type.decode('latin-1')}@{box.offset} {old}->{value}"


def entry_value(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One 32-bit field of one entry of a table (first, last or any) set to an extreme value."""
    box = rng.choice(_tables(data))
    fixed, width = TABLES[box.type]
    first = box.body + 4 + fixed
    entries = (box.offset + box.size - first) // width
    if entries <= 0:
        return entry_count(data, rng)
    entry = rng.choice((0, entries - 1, rng.randrange(entries)))
    at = first + entry * width + 4 * rng.randrange(width // 4)
    out, old, value = _set_extreme(data, at, rng)
    return out, f"{box.type.decode('latin-1')}@{box.offset} entry {entry} {old}->{value}"


def stsz_uniform(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """stsz's uniform sample size set (the per-sample table then unused) to a lie."""
    tables = [box for box in _tables(data) if box.type == b"stsz"]
    box = rng.choice(tables)
    value = rng.choice((1, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 20, rng.getrandbits(16)))
    out = bytearray(data)
    _u32(out, box.body + 4, value)
    return bytes(out), f"stsz@{box.offset} uniform size {value}"


def empty_track(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One track's sample tables all emptied (counts 0): a zero-sample track, consistent with itself."""
    traks = [box for box in boxes(data) if box.type == b"trak"]
    trak = rng.choice(traks)
    out = bytearray(data)
    for box in boxes(data):
        if box.type in TABLES and box.type != b"elst" and _inside(box, trak):
            fixed, _ = TABLES[box.type]
            _u32(out, box.body + 4 + fixed - 4, 0)
    return bytes(out), f"track@{trak.offset} emptied"


def _resize(data: bytes, box: Box, replacement: bytes) -> bytes:
    """C{box} replaced by C{replacement} (a whole box), its ancestors' sizes adjusted (32-bit sizes)."""
    delta = len(replacement) - box.size
    out = bytearray(data[: box.offset] + replacement + data[box.offset + box.size :])
    for parent in box.parents:
        _u32(out, parent.offset, parent.size + delta)
    return bytes(out)


def co64_out_of_range(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """
    stco rewritten as co64 (valid as long as the moov lies after the mdat), then one offset set past the
    file, past 2**32 or to 2**63: a 64-bit offset out of range.
    """
    stcos = [box for box in boxes(data) if box.type == b"stco"]
    moov = next(box for box in boxes(data) if box.type == b"moov")
    if not stcos or any(box.type == b"mdat" and box.offset > moov.offset for box in boxes(data)):
        return entry_value(data, rng)  # moov first: a longer moov would move the sample data
    box = rng.choice(stcos)
    (count,) = struct.unpack_from(">I", data, box.body + 4)
    offsets = list(struct.unpack_from(f">{count}I", data, box.body + 8))
    which = rng.randrange(count)
    offsets[which] = rng.choice((len(data), len(data) + 2**32, 2**63, 2**64 - 1, offsets[which] + 2**32))
    body = data[box.body : box.body + 4] + struct.pack(f">I{count}Q", count, *offsets)
    return _resize(data, box, struct.pack(">I4s", 8 + len(body), b"co64") + body), \
        f"co64@{box.offset} entry {which} -> {offsets[which]}"


def edit_list(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """An edit list added to (or replacing) a track's: empty edits, media times past the end, rate 0."""
    traks = [box for box in boxes(data) if box.type == b"trak"]
    trak = rng.choice(traks)
    entries = rng.choice((
        [(0, -1 & 0xFFFFFFFF, 1)],  # one empty edit and nothing else
        [(rng.getrandbits(31), 0x7FFFFFFF, 1)],  # media time past the end
        [(1000, 0, 0)],  # rate 0 (a dwell)
        [(0xFFFFFFFF, 0, 1), (0xFFFFFFFF, 0, 1)],  # two edits of the longest duration
        [(1, 0xFFFFFFFF, 1), (500, 10, 1), (500, 5, 1)],  # an empty edit then edits going back
    ))
    elst = struct.pack(">I4sII", 16 + 12 * len(entries), b"elst", 0, len(entries)) + b"".join(
        struct.pack(">IIhh", duration, media_time, rate, 0) for duration, media_time, rate in entries)
    edts = struct.pack(">I4s", 8 + len(elst), b"edts") + elst
    old = next((box for box in boxes(data) if box.type == b"edts" and _inside(box, trak)), None)
    if old is not None:
        return _resize(data, old, edts), f"track@{trak.offset} edit list replaced: {entries}"
    # after the tkhd: put it at the start of the trak's body, which keeps the order players expect enough
    tkhd = next(box for box in boxes(data) if box.type == b"tkhd" and _inside(box, trak))
    after = tkhd.offset + tkhd.size
    out = data[:after] + edts + data[after:]
    grown = bytearray(out)
    for parent in trak.parents + (trak,):
        _u32(grown, parent.offset, parent.size + len(edts))
    return bytes(grown), f"track@{trak.offset} edit list added: {entries}"


def stsc_disorder(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """stsc's first-chunk numbers out of order, 0, or its samples per chunk 0."""
    tables = [box for box in _tables(data) if box.type == b"stsc"]
    box = rng.choice(tables)
    (count,) = struct.unpack_from(">I", data, box.body + 4)
    out = bytearray(data)
    if count == 0:
        return entry_count(data, rng)
    entry = rng.randrange(count)
    at = box.body + 8 + 12 * entry
    field = rng.choice(((0, "first chunk"), (4, "samples per chunk"), (8, "description")))
    _u32(out, at + field[0], rng.choice((0, 1, 0xFFFFFFFF)))
    return bytes(out), f"stsc@{box.offset} entry {entry} {field[1]}"


def byte_flips(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A few random bytes of the moov changed."""
    moov = next(box for box in boxes(data) if box.type == b"moov")
    out = bytearray(data)
    spots = [rng.randrange(moov.offset, moov.offset + moov.size) for _ in range(rng.randint(1, 6))]
    for spot in spots:
        out[spot] = rng.randrange(256)
    return bytes(out), f"bytes flipped at {spots}"


MUTATIONS: dict[str, Callable[[bytes, random.Random], tuple[bytes, str]]] = {
    "box_size": box_size,
    "largesize": huge_largesize,
    "truncate": truncate,
    "entry_count": entry_count,
    "entry_value": entry_value,
    "stsz_uniform": stsz_uniform,
    "empty_track": empty_track,
    "co64": co64_out_of_range,
    "edit_list": edit_list,
    "stsc": stsc_disorder,
    "byte_flips": byte_flips,
}


def mutate(data: bytes, rng: random.Random, kind: str | None = None) -> tuple[str, bytes, str]:
    """C{(kind, mutated file, what was done)}: C{kind} (or one drawn) applied once to C{data}."""
    kind = kind or rng.choice(sorted(MUTATIONS))
    mutated, what = MUTATIONS[kind](data, rng)
    return kind, mutated, what


def seek_answer(data: bytes, start: float, end: float | None, max_boxes: int = 4096) -> bytes:
    """
    The body the edge answers C{?start=&end=} with for the file C{data}, made the way the web layer
    makes it (top-level walk, moov index, plan, rendered from the file's bytes).

    @raise h264edge.mp4.MP4Error: the edge refuses it (a clean 4xx/501/502).
    """
    from h264edge.mp4 import BOX_HEADER_READ, MalformedMP4, SeekIndex, UnsupportedMP4, parse_box_header, plan_for_seek

    offset, ftyp, count = 0, None, 0
    while offset < len(data):
        count += 1
        if count > max_boxes:
            raise MalformedMP4("too many top-level boxes")
        box = parse_box_header(data[offset : offset + BOX_HEADER_READ], offset, len(data))
        if box.type == b"ftyp":
            if box.size > 4096:
                raise MalformedMP4("big ftyp")
            ftyp = data[offset : offset + box.size]
        elif box.type == b"moov":
            index = SeekIndex.from_moov(data[offset : offset + box.size], offset, len(data), ftyp)
            plan = plan_for_seek(index, "clip", start, end if end is None or end < index.duration else None)
            if plan.spans_end("clip") > len(data):
                raise AssertionError(f"a plan reaching byte {plan.spans_end('clip')} of a {len(data)}-byte file")
            return plan.render(lambda key, at, length: data[at : at + length])
        elif box.type in (b"moof", b"mfra", b"sidx"):
            raise UnsupportedMP4("fragmented")
        offset += box.size
    raise MalformedMP4("no moov box")
