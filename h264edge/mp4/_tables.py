# -*- test-case-name: tests.test_mp4 -*-
"""
The sample tables of one track, decoded in bulk, and cut to a run of samples.

Nothing here loops over samples in Python.  Tables are decoded once into native arrays, with
per-entry cumulative arrays from C{itertools.accumulate} for C{bisect} lookups.

A cut is mostly L{Original} pieces: runs of table entries copied unchanged from the original moov
(sample sizes, the inner entries of stts and ctts, sync samples and stsc entries when nothing before
the cut is dropped), so the web layer sends them as spans of the cached file.  Only what must be
renumbered is built per cut, with numpy over a view of the native arrays: chunk offsets shifted by a
constant, sync sample numbers, stsc first chunks, the first and last run of stts and ctts.  numpy
shifts 90k chunk offsets in ~30 us where one big-integer addition over the big-endian bytes took
~2.3 ms (and C{map(operator.add, ...)} into an array ~8 ms).
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from itertools import accumulate
from operator import mul
from typing import Callable, Union

import numpy as np
from attrs import frozen

from h264edge.mp4._boxes import MalformedMP4, Node, UnsupportedMP4, full_box_header, make_full_box


def _strictly_increasing(values: array) -> bool:
    """Each value above the one before (numpy: ~1 ms for 500k, a Python loop took ~30 ms)."""
    numbers = np.frombuffer(values, dtype=np.dtype(values.typecode))
    return bool(np.all(numbers[1:] > numbers[:-1]))


def _non_decreasing(values: array) -> bool:
    numbers = np.frombuffer(values, dtype=np.dtype(values.typecode))
    return bool(np.all(numbers[1:] >= numbers[:-1]))


_BIG_ENDIAN_HOST = sys.byteorder == "big"


def _be_array(typecode: str, data: bytes | memoryview) -> array:
    values = array(typecode)
    values.frombytes(data)
    if not _BIG_ENDIAN_HOST:
        values.byteswap()
    return values


def _be_bytes(values: array) -> bytes:
    if _BIG_ENDIAN_HOST:
        return values.tobytes()
    swapped = array(values.typecode, values)
    swapped.byteswap()
    return swapped.tobytes()


def _table(moov: bytes, node: Node, name: str, header: int, entry_size: int, count_at: int) -> tuple[int, int]:
    """(first entry offset, entry count) of a full box whose count sits C{count_at} bytes into its payload."""
    payload = node.payload_start
    if node.end - payload < header:
        raise MalformedMP4(f"{name} box of {node.end - node.start} bytes is too short for its header")
    (count,) = struct.unpack_from(">I", moov, payload + count_at)
    first = payload + header
    room = node.end - first
    if entry_size and count * entry_size > room:
        raise MalformedMP4(
            f"{name} claims {count} entries of {entry_size} bytes but its box holds only {room // entry_size}"
        )
    return first, count


def _version(moov: bytes, node: Node) -> int:
    return moov[node.payload_start]


def _to_big_endian(values: np.ndarray) -> memoryview:
    """The bytes of C{values} (a fresh array, swapped in place) as big-endian words, not copied."""
    if not _BIG_ENDIAN_HOST:
        values.byteswap(inplace=True)
    return values.data.cast("B")


@frozen
class Original:
    """C{length} bytes of the original moov from C{at} (relative to the moov's first byte), copied as is."""

    at: int
    length: int


# bytes built for this cut (a memoryview over a fresh numpy array is not copied until the plan is joined)
Piece = Union[bytes, memoryview, Original]


@frozen(eq=False)
class CutTrack:
    """
    The tables of one track cut to samples [s0, s1): C{pieces} are stts ctts stss stsz stsc, ready to
    write; the chunk offsets wait for the layout (L{offsets_box}).
    """

    s0: int
    s1: int
    pieces: tuple[Piece, ...]
    pieces_length: int
    offsets: array  # every chunk offset of the track, native
    c0: int  # first kept chunk
    count: int  # kept chunks
    first_offset: int  # the first kept chunk starts at the first kept sample
    media_duration: int  # media timescale units
    lo: int  # first byte of kept sample data in the original file
    hi: int  # end (exclusive) of kept sample data

    def offsets_box(self, delta: int, use64: bool) -> tuple[bytes, memoryview]:
        """stco (or co64) with every kept chunk moved by C{delta} bytes: (header, entries)."""
        bits = 64 if use64 else 32
        first = self.first_offset + delta
        if not 0 <= first < 1 << bits:
            raise MalformedMP4(f"chunk offset {first} does not fit {bits} bits")
        kept = np.frombuffer(self.offsets, self.offsets.typecode)[self.c0 : self.c0 + self.count]
        wide = np.dtype(np.uint64 if use64 else np.uint32)
        shift = wide.type(delta % (1 << bits))
        # modular arithmetic is exact: every shifted offset lies within the output (see _data_bounds)
        values = kept + shift if kept.dtype == wide else kept.astype(wide) + shift
        values[0] = first
        header = full_box_header(b"co64" if use64 else b"stco", 0, 0, 4 + self.count * (bits // 8))
        return header + struct.pack(">I", self.count), _to_big_endian(values)

    def offsets_box_size(self, use64: bool) -> int:
        return 16 + self.count * (8 if use64 else 4)


def _pieces_length(pieces: list[Piece]) -> int:
    return sum(piece.length if isinstance(piece, Original) else len(piece) for piece in pieces)


@frozen(eq=False)
class SampleTables:
    """
    Bulk-decoded stts, ctts, stss, stsz/stz2, stsc and stco/co64 of one track.

    Samples are numbered from 0 here (the file numbers them from 1); times are in media timescale units.
    Fields named C{*_raw} hold big-endian table entries exactly as written in a file; fields named
    C{*_at} say where a table's first entry sits in the moov, for L{Original} pieces.
    """

    sample_count: int
    stts: array  # 'I' interleaved (count, delta)
    stts_at: int
    stts_first_sample: array  # 'Q', one per entry plus the total
    stts_first_time: array  # 'Q', one per entry plus the total duration
    ctts_raw: bytes | None  # interleaved (count, offset)
    ctts_version: int
    ctts_first_sample: array | None  # 'Q', one per entry plus the total
    ctts_at: int
    stss: array | None  # 'I', 1-based sync sample numbers, increasing; None: every sample is sync
    stss_at: int
    uniform_size: int  # nonzero: every sample has this size and C{sizes_raw} is empty
    sizes_raw: bytes  # 4 bytes per sample
    sizes_at: int | None  # None when the sizes were not stored as stsz entries (stz2)
    stsc_raw: bytes  # interleaved (first_chunk 1-based, samples_per_chunk, description_index)
    stsc_at: int
    stsc_per_chunk: array  # 'I'
    stsc_first_chunk: array  # 'I', 1-based
    stsc_first_sample: array  # 'Q', one per entry plus the total
    offsets: array  # 'I' or 'Q' (as the file's stco or co64) chunk offsets
    chunk_count: int
    offsets_increase: bool  # chunk offsets never decrease: the first and last kept chunks bound the data

    @property
    def memory_size(self) -> int:
        total = 0
        for values in (
            self.stts, self.stts_first_sample, self.stts_first_time, self.ctts_first_sample, self.stss,
            self.stsc_per_chunk, self.stsc_first_chunk, self.stsc_first_sample, self.offsets,
        ):
            if values is not None:
                total += 64 + values.itemsize * len(values)
        for raw in (self.ctts_raw, self.sizes_raw, self.stsc_raw):
            if raw is not None:
                total += 33 + len(raw)
        return total + 300

    @property
    def total_duration(self) -> int:
        return self.stts_first_time[-1]

    # -- decoding --------------------------------------------------------------------------------

    @classmethod
    def decode(cls, moov: bytes, stbl: Node, track: str) -> "SampleTables":
        def need(box_type: bytes, *alternatives: bytes) -> Node:
            for candidate in (box_type, *alternatives):
                node = stbl.find(candidate)
                if node is not None:
                    return node
            names = " or ".join(t.decode() for t in (box_type, *alternatives))
            raise MalformedMP4(f"{track}: sample table has no {names}")

        # sample sizes first: they fix the sample count every other table must agree with
        size_node = need(b"stsz", b"stz2")
        uniform = 0
        sizes_raw = b""
        sizes_at: int | None = None
        if size_node.type == b"stsz":
            first, count = _table(moov, size_node, "stsz", 12, 0, 8)
            (uniform,) = struct.unpack_from(">I", moov, size_node.payload_start + 4)
            if uniform == 0:
                if count * 4 > size_node.end - first:
                    raise MalformedMP4(f"{track}: stsz claims {count} sizes but holds {(size_node.end - first) // 4}")
                sizes_raw = moov[first : first + 4 * count]
                sizes_at = first
        else:
            first, count = _table(moov, size_node, "stz2", 12, 0, 8)
            field = moov[size_node.payload_start + 7]
            raw = moov[first : size_node.end]
            if field == 16 and len(raw) >= 2 * count:
                sizes = array("I", _be_array("H", raw[: 2 * count]))
            elif field == 8 and len(raw) >= count:
                sizes = array("I", raw[:count])
            elif field == 4 and len(raw) * 2 >= count:
                sizes = array("I", [nibble for byte in raw for nibble in (byte >> 4, byte & 15)][:count])
            else:
                raise MalformedMP4(f"{track}: stz2 with field size {field} cannot hold {count} sizes")
            sizes_raw = _be_bytes(sizes)
        sample_count = count
        if sample_count == 0:
            raise MalformedMP4(f"{track}: no samples")

        # decode times
        node = need(b"stts")
        stts_at, entries = _table(moov, node, "stts", 8, 8, 4)
        stts = _be_array("I", moov[stts_at : stts_at + 8 * entries])
        counts, deltas = stts[0::2], stts[1::2]
        stts_first_sample = array("Q", accumulate(counts, initial=0))
        stts_first_time = array("Q", accumulate(map(mul, counts, deltas), initial=0))
        if stts_first_sample[-1] != sample_count:
            raise MalformedMP4(f"{track}: stts covers {stts_first_sample[-1]} samples, stsz has {sample_count}")

        # composition offsets (read as signed whatever the version says: muxers disagree)
        ctts_raw: bytes | None = None
        ctts_first_sample: array | None = None
        ctts_version = 0
        ctts_at = 0
        ctts_node = stbl.find(b"ctts")
        if ctts_node is not None:
            ctts_version = _version(moov, ctts_node)
            ctts_at, entries = _table(moov, ctts_node, "ctts", 8, 8, 4)
            ctts_raw = moov[ctts_at : ctts_at + 8 * entries]
            ctts_first_sample = array("Q", accumulate(_be_array("I", ctts_raw)[0::2], initial=0))
            if ctts_first_sample[-1] != sample_count:
                raise MalformedMP4(
                    f"{track}: ctts covers {ctts_first_sample[-1]} samples, stsz has {sample_count}"
                )

        stss: array | None = None
        stss_at = 0
        stss_node = stbl.find(b"stss")
        if stss_node is not None:
            stss_at, entries = _table(moov, stss_node, "stss", 8, 4, 4)
            stss = _be_array("I", moov[stss_at : stss_at + 4 * entries])
            if entries and (
                stss[0] < 1 or stss[-1] > sample_count or not _strictly_increasing(stss)
            ):
                raise MalformedMP4(f"{track}: stss numbers are not increasing within 1..{sample_count}")

        node = need(b"stco", b"co64")
        width = 4 if node.type == b"stco" else 8
        first, chunks = _table(moov, node, node.type.decode(), 8, width, 4)
        if chunks == 0:
            raise MalformedMP4(f"{track}: no chunks for {sample_count} samples")
        offsets = _be_array("I" if width == 4 else "Q", moov[first : first + width * chunks])
        increasing = _non_decreasing(offsets)

        node = need(b"stsc")
        stsc_at, entries = _table(moov, node, "stsc", 8, 12, 4)
        stsc_raw = moov[stsc_at : stsc_at + 12 * entries]
        stsc = _be_array("I", stsc_raw)
        first_chunk = stsc[0::3]
        per_chunk = stsc[1::3]
        if not entries or first_chunk[0] != 1:
            raise MalformedMP4(f"{track}: stsc must start at chunk 1")
        if first_chunk[-1] > chunks or not _strictly_increasing(first_chunk):
            raise MalformedMP4(f"{track}: stsc chunk numbers are not increasing within 1..{chunks}")
        if 0 in per_chunk:
            raise MalformedMP4(f"{track}: stsc has an entry with zero samples per chunk")
        # samples per stsc entry, with numpy (a two-hour clip's audio has ~100k entries: ~10 ms in Python)
        starts = np.frombuffer(first_chunk, dtype=np.dtype(first_chunk.typecode)).astype(np.uint64)
        spans = np.diff(np.append(starts, np.uint64(chunks + 1)))
        samples = spans * np.frombuffer(per_chunk, dtype=np.dtype(per_chunk.typecode)).astype(np.uint64)
        if len(samples) and int(samples.max()) > sample_count:  # each product < 2**64; their sum then cannot wrap
            raise MalformedMP4(f"{track}: an stsc entry maps more samples than stsz has ({sample_count})")
        stsc_first_sample = array("Q", np.concatenate((np.zeros(1, np.uint64), np.cumsum(samples))).tobytes())
        if stsc_first_sample[-1] != sample_count:
            raise MalformedMP4(
                f"{track}: stsc maps {stsc_first_sample[-1]} samples into {chunks} chunks, stsz has {sample_count}"
            )

        return cls(
            sample_count=sample_count,
            stts=stts,
            stts_at=stts_at,
            stts_first_sample=stts_first_sample,
            stts_first_time=stts_first_time,
            ctts_raw=ctts_raw,
            ctts_version=ctts_version,
            ctts_first_sample=ctts_first_sample,
            ctts_at=ctts_at,
            stss=stss,
            stss_at=stss_at,
            uniform_size=uniform,
            sizes_raw=sizes_raw,
            sizes_at=sizes_at,
            stsc_raw=stsc_raw,
            stsc_at=stsc_at,
            stsc_per_chunk=per_chunk,
            stsc_first_chunk=first_chunk,
            stsc_first_sample=stsc_first_sample,
            offsets=offsets,
            chunk_count=chunks,
            offsets_increase=increasing,
        )

    # -- lookups ---------------------------------------------------------------------------------

    def dts(self, sample: int) -> int:
        """Decode time of C{sample} (C{sample_count} gives the end of the last sample)."""
        if sample >= self.sample_count:
            return self.stts_first_time[-1]
        entries = len(self.stts_first_sample) - 1
        entry = bisect_right(self.stts_first_sample, sample, 0, entries) - 1
        return self.stts_first_time[entry] + (sample - self.stts_first_sample[entry]) * self.stts[2 * entry + 1]

    def count_before(self, time: int) -> int:
        """How many samples have a decode time strictly before C{time}."""
        entries = len(self.stts_first_time) - 1
        entry = bisect_left(self.stts_first_time, time, 0, entries) - 1
        if entry < 0:
            return 0
        count, delta = self.stts[2 * entry], self.stts[2 * entry + 1]
        inside = count if delta == 0 else min(count, -(-(time - self.stts_first_time[entry]) // delta))
        return self.stts_first_sample[entry] + inside

    def last_at_or_before(self, time: int) -> int:
        """The last sample decoded at or before C{time}, or -1."""
        return self.count_before(time + 1) - 1

    def composition_offset(self, sample: int) -> int:
        if self.ctts_raw is None or self.ctts_first_sample is None:
            return 0
        entries = len(self.ctts_first_sample) - 1
        entry = bisect_right(self.ctts_first_sample, sample, 0, entries) - 1
        (value,) = struct.unpack_from(">i", self.ctts_raw, 8 * entry + 4)
        return int(value)

    def sync_at_or_before(self, sample: int) -> int:
        """The last sync sample at or before C{sample}, or the first sync sample if there is none before."""
        if self.stss is None:
            return max(sample, 0)
        if not self.stss:
            raise UnsupportedMP4("video track has an empty sync sample table: no keyframe to start at")
        index = bisect_right(self.stss, sample + 1) - 1
        return self.stss[max(index, 0)] - 1

    def next_sync(self, sample: int) -> int | None:
        """The first sync sample strictly after C{sample}, if any."""
        if self.stss is None:
            return sample + 1 if sample + 1 < self.sample_count else None
        index = bisect_right(self.stss, sample + 1)
        return self.stss[index] - 1 if index < len(self.stss) else None

    def previous_sync(self, sample: int) -> int | None:
        """The last sync sample strictly before C{sample}, if any."""
        if self.stss is None:
            return sample - 1 if sample > 0 else None
        index = bisect_left(self.stss, sample + 1) - 1
        return self.stss[index] - 1 if index >= 0 else None

    def chunk_offset(self, chunk: int) -> int:
        return self.offsets[chunk]

    def _chunk_of(self, sample: int) -> tuple[int, int, int]:
        """(0-based chunk, first sample of that chunk, stsc entry) for C{sample}."""
        entries = len(self.stsc_first_sample) - 1
        entry = bisect_right(self.stsc_first_sample, sample, 0, entries) - 1
        per_chunk = self.stsc_per_chunk[entry]
        within = (sample - self.stsc_first_sample[entry]) // per_chunk
        chunk = self.stsc_first_chunk[entry] - 1 + within
        return chunk, self.stsc_first_sample[entry] + within * per_chunk, entry

    def _first_of_chunk(self, chunk: int) -> tuple[int, int]:
        """(first sample, sample count) of 0-based C{chunk}."""
        entry = bisect_right(self.stsc_first_chunk, chunk + 1) - 1
        per_chunk = self.stsc_per_chunk[entry]
        return self.stsc_first_sample[entry] + (chunk + 1 - self.stsc_first_chunk[entry]) * per_chunk, per_chunk

    def _size_sum(self, first: int, end: int) -> int:
        if end <= first:
            return 0
        if self.uniform_size:
            return self.uniform_size * (end - first)
        return sum(struct.unpack_from(f">{end - first}I", self.sizes_raw, 4 * first))

    def sample_offset(self, sample: int) -> int:
        chunk, first, _ = self._chunk_of(sample)
        return self.chunk_offset(chunk) + self._size_sum(first, sample)

    def check_data_within(self, size: int, track: str) -> None:
        """
        Every chunk's sample data lies inside a file of C{size} bytes: each chunk offset plus the
        sizes of the samples the chunk holds (numpy over all chunks at once: a lying size anywhere,
        not only in the last chunk, is caught).

        @raise MalformedMP4: naming the first chunk that runs past C{size}.
        """
        chunks = self.chunk_count
        starts = np.frombuffer(self.stsc_first_chunk, np.dtype(self.stsc_first_chunk.typecode)).astype(np.int64)
        runs = np.diff(np.append(starts, chunks + 1))
        per_chunk = np.repeat(np.frombuffer(self.stsc_per_chunk, np.dtype(self.stsc_per_chunk.typecode)), runs)
        per_chunk = per_chunk.astype(np.uint64)
        if self.uniform_size:
            lengths = per_chunk * np.uint64(self.uniform_size)  # < 2**32 * 2**32: no wrap
        else:
            sizes = np.frombuffer(self.sizes_raw, ">u4").astype(np.uint64)
            ends = np.cumsum(sizes)  # at most 2**32 samples of < 2**32 bytes: no wrap
            totals = np.concatenate((np.zeros(1, np.uint64), ends))
            first = np.concatenate((np.zeros(1, np.uint64), np.cumsum(per_chunk)[:-1])).astype(np.int64)
            lengths = totals[first + per_chunk.astype(np.int64)] - totals[first]
        offsets = np.frombuffer(self.offsets, np.dtype(self.offsets.typecode)).astype(np.uint64)
        limit = np.uint64(size)
        # each term alone first: their sum cannot wrap when both are within the file
        outside = (offsets > limit) | (lengths > limit)
        outside |= offsets + np.where(outside, np.uint64(0), lengths) > limit
        if outside.any():
            chunk = int(np.argmax(outside))
            raise MalformedMP4(
                f"{track}: chunk {chunk + 1} at byte {int(offsets[chunk])} holds {int(lengths[chunk])} bytes of "
                f"samples, past the end of the {size}-byte file"
            )

    def _data_bounds(self, c0: int, c1: int, s0: int, s1: int) -> tuple[int, int]:
        """First and end byte of samples [s0, s1) living in chunks [c0, c1)."""
        lo = self.sample_offset(s0)
        if self.offsets_increase:
            last = c1 - 1
        else:
            offsets = self.offsets[c0:c1]
            if len(offsets) > 1:
                lo = min(lo, min(offsets[1:]))
            last = c0 + offsets.index(max(offsets))
        first, count = self._first_of_chunk(last)
        start, end = max(first, s0), min(first + count, s1)
        return lo, self.chunk_offset(last) + self._size_sum(first, start) + self._size_sum(start, end)

    # -- cutting ---------------------------------------------------------------------------------

    @staticmethod
    def _cut_runs(
        box_type: bytes, version: int, at: int, first_sample: array, value: Callable[[int], bytes], s0: int, s1: int
    ) -> list[Piece]:
        """
        A run-length table of (count, value) pairs cut to [s0, s1): only the first and last runs change
        their count; C{value(entry)} is the 4-byte value of an entry, C{at} where the table's entries start.
        """
        entries = len(first_sample) - 1
        e0 = bisect_right(first_sample, s0, 0, entries) - 1
        e1 = bisect_right(first_sample, s1 - 1, 0, entries) - 1
        count = e1 - e0 + 1
        pieces: list[Piece] = [
            full_box_header(box_type, version, 0, 4 + 8 * count)
            + struct.pack(">II", count, min(first_sample[e0 + 1], s1) - s0)
            + value(e0)
        ]
        if count > 2:
            pieces.append(Original(at + 8 * (e0 + 1), 8 * (count - 2)))
        if count > 1:
            pieces.append(struct.pack(">I", s1 - first_sample[e1]) + value(e1))
        return pieces

    def _cut_stts_trimmed(self, s0: int, s1: int, head: int, tail: int) -> list[Piece]:
        """
        stts for samples [s0, s1) with the first sample's duration shortened by C{head} ticks and the
        last one's by C{tail}: the first and last runs are split so that only those samples change.
        """
        first_sample, stts = self.stts_first_sample, self.stts
        entries = len(first_sample) - 1
        e0 = bisect_right(first_sample, s0, 0, entries) - 1
        e1 = bisect_right(first_sample, s1 - 1, 0, entries) - 1
        front = [[min(first_sample[e0 + 1], s1) - s0, stts[2 * e0 + 1]]]
        back = [[s1 - first_sample[e1], stts[2 * e1 + 1]]] if e1 > e0 else []
        if head:
            count, delta = front.pop(0)
            front[0:0] = [[1, delta - head]] + ([[count - 1, delta]] if count > 1 else [])
        if tail:
            runs = back or front
            count, delta = runs.pop()
            runs += ([[count - 1, delta]] if count > 1 else []) + [[1, delta - tail]]
        if any(delta < 0 for _, delta in front + back):
            raise MalformedMP4(f"a cut trims {head} + {tail} ticks from samples shorter than that")
        middle = max(e1 - e0 - 1, 0)
        count = len(front) + middle + len(back)
        pieces: list[Piece] = [
            full_box_header(b"stts", 0, 0, 4 + 8 * count)
            + struct.pack(f">{1 + 2 * len(front)}I", count, *(n for run in front for n in run))
        ]
        if middle:
            pieces.append(Original(self.stts_at + 8 * (e0 + 1), 8 * middle))
        if back:
            pieces.append(struct.pack(f">{2 * len(back)}I", *(n for run in back for n in run)))
        return pieces

    def _cut_stss(self, stss: array, s0: int, s1: int) -> list[Piece]:
        j0 = bisect_left(stss, s0 + 1)
        j1 = bisect_left(stss, s1 + 1)
        header = full_box_header(b"stss", 0, 0, 4 + 4 * (j1 - j0)) + struct.pack(">I", j1 - j0)
        if j1 == j0:
            return [header]
        if s0 == 0:
            return [header, Original(self.stss_at + 4 * j0, 4 * (j1 - j0))]
        renumbered = np.frombuffer(stss, np.uint32)[j0:j1] - np.uint32(s0)  # stss[j0] > s0
        return [header, _to_big_endian(renumbered)]

    def _cut_stsz(self, s0: int, s1: int) -> list[Piece]:
        if self.uniform_size:
            return [make_full_box(b"stsz", 0, 0, struct.pack(">II", self.uniform_size, s1 - s0))]
        header = full_box_header(b"stsz", 0, 0, 8 + 4 * (s1 - s0)) + struct.pack(">II", 0, s1 - s0)
        if self.sizes_at is None:
            return [header, self.sizes_raw[4 * s0 : 4 * s1]]
        return [header, Original(self.sizes_at + 4 * s0, 4 * (s1 - s0))]

    def _cut_stsc(self, s0: int, s1: int) -> tuple[list[Piece], int, int]:
        """stsc for samples [s0, s1) with the first kept chunk renumbered 1, and the kept chunks [c0, c1]."""
        c0, first0, e0 = self._chunk_of(s0)
        c1, first1, e1 = self._chunk_of(s1 - 1)
        raw = self.stsc_raw
        kept = e1 - e0 + 1  # entries e0..e1 of the original
        per_chunk, description = struct.unpack_from(">II", raw, 12 * e0 + 4)
        skipped = s0 - first0
        # entries e0 and e1 are rewritten; those between are copied, renumbered by -c0
        head = [[1, per_chunk - skipped, description]]
        if skipped and c1 > c0 and (kept == 1 or self.stsc_first_chunk[e0 + 1] - c0 != 2):
            head.append([2, per_chunk, description])
        tail: list[list[int]] = []
        if kept > 1:
            last_first, last_per_chunk, last_description = struct.unpack_from(">III", raw, 12 * e1)
            tail.append([last_first - c0, last_per_chunk, last_description])
        ending = tail if tail else head
        last_chunk = c1 - c0 + 1
        kept_last = s1 - max(first1, s0)
        if ending[-1][0] == last_chunk:
            ending[-1][1] = kept_last
        elif ending[-1][1] != kept_last:
            ending.append([last_chunk, kept_last, ending[-1][2]])
        middle = max(kept - 2, 0)
        count = len(head) + middle + len(tail)
        pieces: list[Piece] = [
            full_box_header(b"stsc", 0, 0, 4 + 12 * count)
            + struct.pack(f">{1 + 3 * len(head)}I", count, *(n for entry in head for n in entry))
        ]
        if middle and c0 == 0:
            pieces.append(Original(self.stsc_at + 12 * (e0 + 1), 12 * middle))
        elif middle:
            entries = np.frombuffer(raw, ">u4").reshape(-1, 3)[e0 + 1 : e1].copy()
            first_chunks = np.frombuffer(self.stsc_first_chunk, np.uint32)[e0 + 1 : e1]
            entries[:, 0] = first_chunks - np.uint32(c0)  # every first chunk there is > c0 + 1
            pieces.append(entries.data.cast("B"))
        if tail:
            pieces.append(struct.pack(f">{3 * len(tail)}I", *(n for entry in tail for n in entry)))
        return pieces, c0, c1

    def cut(self, s0: int, s1: int, head: int = 0, tail: int = 0) -> CutTrack:
        """
        Tables for samples [s0, s1) (0-based, s0 < s1), renumbered from the first kept sample; the
        first sample's duration shortened by C{head} ticks and the last one's by C{tail} (timed text:
        a cue showing at the cut starts at the cut with what is left of it, one still showing at the
        end stops there).
        """
        stts = self.stts
        if head or tail:
            pieces = self._cut_stts_trimmed(s0, s1, head, tail)
        else:
            pieces = self._cut_runs(
                b"stts", 0, self.stts_at, self.stts_first_sample, lambda e: struct.pack(">I", stts[2 * e + 1]),
                s0, s1,
            )
        ctts = self.ctts_raw
        if ctts is not None and self.ctts_first_sample is not None:
            pieces += self._cut_runs(
                b"ctts", self.ctts_version, self.ctts_at, self.ctts_first_sample, lambda e: ctts[8 * e + 4 : 8 * e + 8],
                s0, s1,
            )
        if self.stss is not None:
            pieces += self._cut_stss(self.stss, s0, s1)
        pieces += self._cut_stsz(s0, s1)
        stsc, c0, c1 = self._cut_stsc(s0, s1)
        pieces += stsc
        lo, hi = self._data_bounds(c0, c1 + 1, s0, s1)
        return CutTrack(
            s0=s0,
            s1=s1,
            pieces=tuple(pieces),
            pieces_length=_pieces_length(pieces),
            offsets=self.offsets,
            c0=c0,
            count=c1 - c0 + 1,
            first_offset=self.sample_offset(s0),
            media_duration=self.dts(s1) - self.dts(s0) - head - tail,
            lo=lo,
            hi=hi,
        )
