"""The WAL archive in the repository: what is archived for a target, and where.

Layout: `targets/<target>/wal/<file>.dv`, where <file> is a complete segment (`000000010000000000000003`),
a timeline history file (`00000002.history`), or the newest partial segment (`<segment>.partial`) that
the WAL streamer re-uploads every few seconds so the archive is never more than seconds behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from workers.engines.postgresql.walnames import DEFAULT_SEGMENT_SIZE, HISTORY_RE, SEGMENT_RE, Segment
from workers.repository.objects import ObjectRepository

SUFFIX = ".dv"
PARTIAL = ".partial"


def wal_prefix(target: str) -> str:
    return f"targets/{target}/wal/"


def wal_key(target: str, filename: str) -> str:
    return f"{wal_prefix(target)}{filename}{SUFFIX}"


def archivable(filename: str) -> bool:
    """Files the streamer uploads: complete segments, history files, and the partial segment."""
    base = filename.removesuffix(PARTIAL)
    return bool(SEGMENT_RE.match(base) or (base == filename and HISTORY_RE.match(filename)))


@dataclass(frozen=True)
class WalEntry:
    filename: str
    key: str
    uploaded_at: datetime
    segment: Segment | None  # None for history files
    partial: bool


def list_wal(repo: ObjectRepository, target: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> list[WalEntry]:
    """Every archived WAL file of a target, segments in WAL order, history files first."""
    entries = []
    for listed in repo.store.list_entries(wal_prefix(target)):
        filename = listed.key[len(wal_prefix(target)) :].removesuffix(SUFFIX)
        if not archivable(filename):
            continue
        partial = filename.endswith(PARTIAL)
        base = filename.removesuffix(PARTIAL)
        segment = Segment.parse(base, segment_size) if SEGMENT_RE.match(base) else None
        entries.append(WalEntry(filename, listed.key, listed.uploaded_at, segment, partial))
    return sorted(entries, key=lambda e: (e.segment is not None, e.segment or Segment(0, 0), e.partial))


def complete_segments(entries: list[WalEntry]) -> dict[Segment, WalEntry]:
    return {e.segment: e for e in entries if e.segment is not None and not e.partial}


def first_gap(entries: list[WalEntry], start: Segment, end: Segment) -> Segment | None:
    """The first segment from `start` to `end` (same timeline) missing from the archive, if any.

    A partial object stands in for the last segment only: it is what exists of the segment being written.
    """
    have = complete_segments(entries)
    partials = {e.segment for e in entries if e.partial}
    for segno in range(start.segno, end.segno + 1):
        segment = Segment(start.timeline, segno)
        if segment not in have and not (segno == end.segno and segment in partials):
            return segment
    return None
