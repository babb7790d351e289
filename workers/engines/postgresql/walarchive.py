"""The WAL archive in the repository: what is archived for a target, and where.

Layout: `targets/<target>/wal/<file>.dv`, where <file> is a complete segment (`000000010000000000000003`),
a timeline history file (`00000002.history`), or the newest partial segment (`<segment>.partial`) that
the WAL streamer re-uploads every few seconds so the archive is never more than seconds behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from workers.engines.base import LogArchive, LogFile
from workers.engines.postgresql.commitindex import index_key
from workers.engines.postgresql.timelines import Switch, parse_history
from workers.engines.postgresql.walnames import (
    DEFAULT_SEGMENT_SIZE,
    HISTORY_RE,
    SEGMENT_RE,
    Segment,
    parse_lsn,
)
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


def segment_size_of(manifests: list[dict[str, Any]]) -> int:
    """The WAL segment size the newest full recorded (PostgreSQL's default before there is one)."""
    fulls = [m for m in manifests if m["kind"] == "full"]
    return (fulls[-1].get("wal_segment_size") if fulls else None) or DEFAULT_SEGMENT_SIZE


def read_histories(repo: ObjectRepository, entries: list[WalEntry]) -> dict[int, list[Switch]]:
    """timeline -> its ancestors' switches, from every archived history file (each a few bytes)."""
    found = {}
    for entry in entries:
        if entry.segment is None and (match := HISTORY_RE.match(entry.filename)):
            found[int(match.group(1), 16)] = parse_history(b"".join(repo.get_stream(entry.key)).decode())
    return found


class WalArchive(LogArchive):
    """The archived WAL as engine-neutral code reads it: a file's position is its segment number.

    With the archived history files, a timeline's WAL continues on its newest descendant: from the
    segment holding a switch point on, the child's file is the one to read (PostgreSQL copies the
    parent's WAL before the switch into it when it promotes).
    """

    def __init__(
        self,
        target: str,
        entries: list[WalEntry],
        segment_size: int,
        histories: dict[int, list[Switch]] | None = None,
    ) -> None:
        super().__init__(
            wal_prefix(target),
            [
                LogFile(
                    e.key,
                    e.filename,
                    e.segment.timeline if e.segment else 0,
                    e.segment.segno if e.segment else None,
                    e.partial,
                    e.uploaded_at,
                )
                for e in entries
            ],
        )
        self.target = target
        self.entries = entries
        self.segment_size = segment_size
        self.histories = histories or {}

    def path(self, timeline: int) -> list[tuple[int, int]]:
        """(timeline, first segment number) from `timeline` to the newest timeline descending from it."""
        newest = max(
            (t for t, switches in self.histories.items() if any(s.timeline == timeline for s in switches)),
            default=timeline,
        )
        if newest == timeline:
            return [(timeline, 0)]
        switches = self.histories[newest]
        chain = [s.timeline for s in switches] + [newest]
        return [(timeline, 0)] + [
            (chain[i + 1], switches[i].lsn // self.segment_size)
            for i in range(chain.index(timeline), len(switches))
        ]

    def timeline_at(self, timeline: int, segno: int) -> int:
        """The timeline whose file holds segment `segno` of `timeline`'s history as it continued."""
        return next(t for t, first in reversed(self.path(timeline)) if first <= segno)

    def first_gap(self, timeline: int, start: int, end: int) -> int | None:
        have = {(f.timeline, f.position) for f in self.files if not f.partial}
        partial = {(f.timeline, f.position) for f in self.files if f.partial}
        for position in range(start, end + 1):
            key = (self.timeline_at(timeline, position), position)
            if key not in have and not (position == end and key in partial):
                return position
        return None

    def span(self, backup: dict[str, Any]) -> tuple[int, int, int]:
        timeline = backup["timeline"]
        start, stop = (parse_lsn(backup[k]) // self.segment_size for k in ("start_lsn", "stop_lsn"))
        return timeline, start, stop

    def name(self, timeline: int, position: int) -> str:
        return Segment(timeline, position).name(self.segment_size)

    def companions(self, key: str) -> list[str]:
        filename = key.removeprefix(self.prefix).removesuffix(SUFFIX)
        return [index_key(self.target, filename)] if filename != key else []


def wal_archive(repo: ObjectRepository, target: str, manifests: list[dict[str, Any]]) -> WalArchive:
    """The target's archived WAL, read with the segment size its newest full recorded."""
    segment_size = segment_size_of(manifests)
    entries = list_wal(repo, target, segment_size)
    return WalArchive(target, entries, segment_size, read_histories(repo, entries))
