"""PostgreSQL's WAL arithmetic: LSNs, segment numbers and segment file names."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
HISTORY_RE = re.compile(r"^([0-9A-F]{8})\.history$")


def parse_lsn(text: str) -> int:
    """`16/B374D848` -> its 64-bit position."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(frozen=True, order=True)
class Segment:
    """One WAL segment: ordered by timeline, then position."""

    timeline: int
    segno: int

    def name(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
        per_id = 0x100000000 // segment_size
        return f"{self.timeline:08X}{self.segno // per_id:08X}{self.segno % per_id:08X}"

    @classmethod
    def parse(cls, name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Segment:
        match = SEGMENT_RE.match(name)
        if match is None:
            raise ValueError(f"{name!r} is not a WAL segment file name")
        timeline, log_id, seg = (int(g, 16) for g in match.groups())
        return cls(timeline, log_id * (0x100000000 // segment_size) + seg)

    @classmethod
    def of(cls, timeline: int, lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Segment:
        """The segment holding the byte at `lsn`."""
        return cls(timeline, lsn // segment_size)


def parse_size(text: str) -> int:
    """PostgreSQL's `SHOW wal_segment_size` output (`16MB`, `1GB`) in bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*(kB|MB|GB)\s*", text)
    if match is None:
        raise ValueError(f"unexpected wal_segment_size {text!r}")
    return int(match.group(1)) * {"kB": 1024, "MB": 1024**2, "GB": 1024**3}[match.group(2)]
