# -*- test-case-name: tests.test_mp4 -*-
"""
The sample tables of one track, decoded in bulk into arrays, and cut to a run of samples.

Nothing here loops over samples in Python: tables are read with C{array.frombytes}, cumulative sums
come from C{itertools.accumulate}, lookups are C{bisect} over per-entry arrays, and cutting is array
slicing plus C{map(operator.sub, ...)} for the columns that must be renumbered.
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from itertools import accumulate, chain, repeat
from operator import add, mul, sub

from attrs import frozen

from h264edge.mp4._boxes import MalformedMP4, Node, make_full_box

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


@frozen(eq=False)
class CutTrack:
    """The tables of one track cut to samples [s0, s1), except chunk offsets, which wait for the layout."""

    stbl_tables: bytes  # stts ctts stss stsz stsc, ready to write
    chunk_offsets: array  # 'Q', original file offsets of the kept chunks (first one moved to sample s0)
    media_duration: int  # media timescale units
    lo: int  # first byte of kept sample data in the original file
    hi: int  # end (exclusive) of kept sample data

    def offsets_box(self, delta: int, use64: bool) -> bytes:
        moved = array("Q", map(add, self.chunk_offsets, repeat(delta)))
        if use64:
            return make_full_box(b"co64", 0, 0, struct.pack(">I", len(moved)) + _be_bytes(moved))
        return make_full_box(b"stco", 0, 0, struct.pack(">I", len(moved)) + _be_bytes(array("I", moved)))

    def offsets_box_size(self, use64: bool) -> int:
        return 16 + len(self.chunk_offsets) * (8 if use64 else 4)


@frozen(eq=False)
class SampleTables:
    """
    Bulk-decoded stts, ctts, stss, stsz/stz2, stsc and stco/co64 of one track.

    Samples are numbered from 0 here (the file numbers them from 1); times are in media timescale units.
    """

    sample_count: int
    stts: array  # 'I' interleaved (count, delta)
    stts_first_sample: array  # 'Q', one per entry plus the total
    stts_first_time: array  # 'Q', one per entry plus the total duration
    ctts: array | None  # 'I' interleaved (count, offset as unsigned bits)
    ctts_version: int
    ctts_first_sample: array | None  # 'Q', one per entry plus the total
    stss: array | None  # 'I', 1-based sync sample numbers, increasing; None: every sample is sync
    uniform_size: int  # nonzero: every sample has this size and C{sizes} is None
    sizes: array | None  # 'I'
    stsc: array  # 'I' interleaved (first_chunk 1-based, samples_per_chunk, description_index)
    stsc_first_chunk: array  # 'I', 1-based
    stsc_first_sample: array  # 'Q', one per entry plus the total
    chunk_offsets: array  # 'Q'

    @property
    def memory_size(self) -> int:
        total = 0
        for values in (
            self.stts, self.stts_first_sample, self.stts_first_time, self.ctts, self.ctts_first_sample,
            self.stss, self.sizes, self.stsc, self.stsc_first_chunk, self.stsc_first_sample,
            self.chunk_offsets,
        ):
            if values is not None:
                total += 64 + values.itemsize * len(values)
        return total + 200

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
        sizes: array | None = None
        if size_node.type == b"stsz":
            first, count = _table(moov, size_node, "stsz", 12, 0, 8)
            (uniform,) = struct.unpack_from(">I", moov, size_node.payload_start + 4)
            if uniform == 0:
                if count * 4 > size_node.end - first:
                    raise MalformedMP4(f"{track}: stsz claims {count} sizes but holds {(size_node.end - first) // 4}")
                sizes = _be_array("I", moov[first : first + 4 * count])
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
        sample_count = count
        if sample_count == 0:
            raise MalformedMP4(f"{track}: no samples")

        # decode times
        node = need(b"stts")
        first, entries = _table(moov, node, "stts", 8, 8, 4)
        stts = _be_array("I", moov[first : first + 8 * entries])
        counts, deltas = stts[0::2], stts[1::2]
        stts_first_sample = array("Q", accumulate(counts, initial=0))
        stts_first_time = array("Q", accumulate(map(mul, counts, deltas), initial=0))
        if stts_first_sample[-1] != sample_count:
            raise MalformedMP4(f"{track}: stts covers {stts_first_sample[-1]} samples, stsz has {sample_count}")

        # composition offsets (signed whatever the version says: muxers disagree)
        ctts: array | None = None
        ctts_first_sample: array | None = None
        ctts_version = 0
        ctts_node = stbl.find(b"ctts")
        if ctts_node is not None:
            ctts_version = _version(moov, ctts_node)
            first, entries = _table(moov, ctts_node, "ctts", 8, 8, 4)
            ctts = _be_array("I", moov[first : first + 8 * entries])
            ctts_first_sample = array("Q", accumulate(ctts[0::2], initial=0))
            if ctts_first_sample[-1] != sample_count:
                raise MalformedMP4(
                    f"{track}: ctts covers {ctts_first_sample[-1]} samples, stsz has {sample_count}"
                )

        stss: array | None = None
        stss_node = stbl.find(b"stss")
        if stss_node is not None:
            first, entries = _table(moov, stss_node, "stss", 8, 4, 4)
            stss = _be_array("I", moov[first : first + 4 * entries])
            if entries and (
                stss[0] < 1 or stss[-1] > sample_count or any(map(int.__ge__, stss[:-1], stss[1:]))
            ):
                raise MalformedMP4(f"{track}: stss numbers are not increasing within 1..{sample_count}")

        node = need(b"stco", b"co64")
        if node.type == b"stco":
            first, chunks = _table(moov, node, "stco", 8, 4, 4)
            chunk_offsets = array("Q", _be_array("I", moov[first : first + 4 * chunks]))
        else:
            first, chunks = _table(moov, node, "co64", 8, 8, 4)
            chunk_offsets = _be_array("Q", moov[first : first + 8 * chunks])
        if chunks == 0:
            raise MalformedMP4(f"{track}: no chunks for {sample_count} samples")

        node = need(b"stsc")
        first, entries = _table(moov, node, "stsc", 8, 12, 4)
        stsc = _be_array("I", moov[first : first + 12 * entries])
        first_chunk = stsc[0::3]
        per_chunk = stsc[1::3]
        if not entries or first_chunk[0] != 1:
            raise MalformedMP4(f"{track}: stsc must start at chunk 1")
        if first_chunk[-1] > chunks or any(map(int.__ge__, first_chunk[:-1], first_chunk[1:])):
            raise MalformedMP4(f"{track}: stsc chunk numbers are not increasing within 1..{chunks}")
        if 0 in per_chunk:
            raise MalformedMP4(f"{track}: stsc has an entry with zero samples per chunk")
        spans = map(sub, chain(first_chunk[1:], (chunks + 1,)), first_chunk)
        stsc_first_sample = array("Q", accumulate(map(mul, spans, per_chunk), initial=0))
        if stsc_first_sample[-1] != sample_count:
            raise MalformedMP4(
                f"{track}: stsc maps {stsc_first_sample[-1]} samples into {chunks} chunks, stsz has {sample_count}"
            )

        return cls(
            sample_count=sample_count,
            stts=stts,
            stts_first_sample=stts_first_sample,
            stts_first_time=stts_first_time,
            ctts=ctts,
            ctts_version=ctts_version,
            ctts_first_sample=ctts_first_sample,
            stss=stss,
            uniform_size=uniform,
            sizes=sizes,
            stsc=stsc,
            stsc_first_chunk=first_chunk,
            stsc_first_sample=stsc_first_sample,
            chunk_offsets=chunk_offsets,
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
        if self.ctts is None or self.ctts_first_sample is None:
            return 0
        entries = len(self.ctts_first_sample) - 1
        entry = bisect_right(self.ctts_first_sample, sample, 0, entries) - 1
        value = self.ctts[2 * entry + 1]
        return value - (1 << 32) if value & 0x80000000 else value

    def sync_at_or_before(self, sample: int) -> int:
        """The last sync sample at or before C{sample}, or the first sync sample if there is none before."""
        if self.stss is None:
            return max(sample, 0)
        if not self.stss:
            raise MalformedMP4("track has an empty sync sample table")
        index = bisect_right(self.stss, sample + 1) - 1
        return self.stss[max(index, 0)] - 1

    def previous_sync(self, sample: int) -> int | None:
        """The last sync sample strictly before C{sample}, if any."""
        if self.stss is None:
            return sample - 1 if sample > 0 else None
        index = bisect_left(self.stss, sample + 1) - 1
        return self.stss[index] - 1 if index >= 0 else None

    def _chunk_of(self, sample: int) -> tuple[int, int, int]:
        """(0-based chunk, first sample of that chunk, stsc entry) for C{sample}."""
        entries = len(self.stsc_first_sample) - 1
        entry = bisect_right(self.stsc_first_sample, sample, 0, entries) - 1
        per_chunk = self.stsc[3 * entry + 1]
        within = (sample - self.stsc_first_sample[entry]) // per_chunk
        chunk = self.stsc_first_chunk[entry] - 1 + within
        return chunk, self.stsc_first_sample[entry] + within * per_chunk, entry

    def _size_sum(self, first: int, end: int) -> int:
        if self.sizes is None:
            return self.uniform_size * (end - first)
        return sum(self.sizes[first:end])

    def sample_offset(self, sample: int) -> int:
        chunk, first, _ = self._chunk_of(sample)
        return self.chunk_offsets[chunk] + self._size_sum(first, sample)

    def data_end(self) -> int:
        """End (exclusive) of the sample data in the file, assuming chunks do not overlap."""
        return self._chunk_end(0, len(self.chunk_offsets), 0, self.sample_count)

    def _chunk_end(self, first_chunk: int, end_chunk: int, s0: int, s1: int) -> int:
        """The end of the kept samples of the chunk placed last in the file among [first_chunk, end_chunk)."""
        offsets = self.chunk_offsets[first_chunk:end_chunk]
        last = first_chunk + offsets.index(max(offsets))
        # first sample of chunk C{last}
        entries = len(self.stsc_first_chunk)
        entry = bisect_right(self.stsc_first_chunk, last + 1, 0, entries) - 1
        per_chunk = self.stsc[3 * entry + 1]
        first = self.stsc_first_sample[entry] + (last + 1 - self.stsc_first_chunk[entry]) * per_chunk
        start, end = max(first, s0), min(first + per_chunk, s1)
        base = self.chunk_offsets[last] + (self._size_sum(first, start) if start > first else 0)
        return base + self._size_sum(start, end)

    # -- cutting ---------------------------------------------------------------------------------

    def _cut_runs(self, pairs: array, first_sample: array, s0: int, s1: int) -> array:
        entries = len(first_sample) - 1
        e0 = bisect_right(first_sample, s0, 0, entries) - 1
        e1 = bisect_right(first_sample, s1 - 1, 0, entries) - 1
        body = pairs[2 * e0 : 2 * e1 + 2]
        body[0] = min(first_sample[e0 + 1], s1) - s0
        if e1 > e0:
            body[-2] = s1 - first_sample[e1]
        return body

    def cut(self, s0: int, s1: int) -> CutTrack:
        """Tables for samples [s0, s1) (0-based, s0 < s1), renumbered from the first kept sample."""
        parts = []
        stts = self._cut_runs(self.stts, self.stts_first_sample, s0, s1)
        parts.append(make_full_box(b"stts", 0, 0, struct.pack(">I", len(stts) // 2) + _be_bytes(stts)))
        if self.ctts is not None and self.ctts_first_sample is not None:
            ctts = self._cut_runs(self.ctts, self.ctts_first_sample, s0, s1)
            parts.append(
                make_full_box(b"ctts", self.ctts_version, 0, struct.pack(">I", len(ctts) // 2) + _be_bytes(ctts))
            )
        if self.stss is not None:
            j0 = bisect_left(self.stss, s0 + 1)
            j1 = bisect_left(self.stss, s1 + 1)
            stss = array("I", map(sub, self.stss[j0:j1], repeat(s0)))
            parts.append(make_full_box(b"stss", 0, 0, struct.pack(">I", len(stss)) + _be_bytes(stss)))
        if self.sizes is None:
            parts.append(make_full_box(b"stsz", 0, 0, struct.pack(">II", self.uniform_size, s1 - s0)))
        else:
            parts.append(
                make_full_box(b"stsz", 0, 0, struct.pack(">II", 0, s1 - s0) + _be_bytes(self.sizes[s0:s1]))
            )

        c0, first0, e0 = self._chunk_of(s0)
        c1, first1, e1 = self._chunk_of(s1 - 1)
        body = self.stsc[3 * e0 : 3 * e1 + 3]
        body[0] = c0 + 1  # the first kept chunk becomes chunk 1
        body[0::3] = array("I", map(sub, body[0::3], repeat(c0)))
        skipped = s0 - first0
        if skipped:
            per_chunk, description = body[1], body[2]
            head = array("I", (1, per_chunk - skipped, description))
            if c1 > c0 and (len(body) == 3 or body[3] != 2):
                head.extend((2, per_chunk, description))
            body = head + body[3:]
        last_chunk = c1 - c0 + 1
        kept_last = s1 - max(first1, s0)
        if body[-3] == last_chunk:
            body[-2] = kept_last
        elif body[-2] != kept_last:
            body.extend((last_chunk, kept_last, body[-1]))
        parts.append(make_full_box(b"stsc", 0, 0, struct.pack(">I", len(body) // 3) + _be_bytes(body)))

        offsets = self.chunk_offsets[c0 : c1 + 1]
        offsets[0] = self.sample_offset(s0)
        return CutTrack(
            stbl_tables=b"".join(parts),
            chunk_offsets=offsets,
            media_duration=self.dts(s1) - self.dts(s0),
            lo=min(offsets),
            hi=self._chunk_end(c0, c1 + 1, s0, s1),
        )
