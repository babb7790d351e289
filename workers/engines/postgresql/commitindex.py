"""The commit index: where each transaction committed in the archived WAL, so a moment is a record.

PostgreSQL given a target time stops at the first commit *after* it, and fails when none is archived
(a quiet database, the last second of the window). deskvault resolves the moment itself: every archived
WAL file has a small encrypted index beside it (`targets/<target>/wal-index/<file>.dv`) listing its
commit records (LSN, commit time, xid) and named restore points, read with `pg_waldump` as the file is
uploaded. A restore to T then stops right after the last commit at or before T, by LSN.

A record that begins in one segment and ends in the next is decoded only with both at hand, so a
complete segment's index is written once the next segment's beginning is in the spool (or the segment
ends in a WAL switch, or its last record ends at its end).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from workers.engines.base import EngineError
from workers.engines.postgresql.walnames import Segment, format_lsn, parse_lsn

INDEX_VERSION = 1
XLOG_BLOCK = 8192
SHORT_PAGE_HEADER = 24  # SizeOfXLogShortPHD, aligned
LONG_PAGE_HEADER = 40  # SizeOfXLogLongPHD: the first page of each segment
ALIGN = 8
RECORD_RE = re.compile(
    r"^rmgr: (\w+)\s+len \(rec/tot\):\s+\d+/\s*(\d+), tx:\s+(\d+), lsn: ([0-9A-F]+/[0-9A-F]+), "
    r"prev [0-9A-F]+/[0-9A-F]+, desc: (.*)$"
)
COMMIT_RE = re.compile(r"^COMMIT(?:_PREPARED (\d+):)? (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")
RESTORE_POINT_RE = re.compile(r"^RESTORE_POINT (.*)$")


def index_prefix(target: str) -> str:
    return f"targets/{target}/wal-index/"


def index_key(target: str, filename: str) -> str:
    """Where the index of the archived WAL file `filename` (a segment or `<segment>.partial`) lives."""
    return f"{index_prefix(target)}{filename}.dv"


@dataclass(frozen=True)
class Commit:
    lsn: int  # where the commit record starts: recovery_target_lsn stops right after it
    at: datetime
    xid: int
    end: int  # where it ends: replay stopped after it has replayed exactly up to here

    def describe(self) -> str:
        moment = f"{self.at:%Y-%m-%dT%H:%M:%S.%fZ}"
        return f"the commit of transaction {self.xid} at {moment} (LSN {format_lsn(self.lsn)})"


@dataclass(frozen=True)
class RestorePoint:
    lsn: int
    name: str
    end: int


@dataclass(frozen=True)
class FileIndex:
    """What one archived WAL file holds of interest to a restore."""

    filename: str
    commits: tuple[Commit, ...]
    restore_points: tuple[RestorePoint, ...]
    end_lsn: int  # everything before it was decoded (a partial segment: what was received)
    # For the segment being written: every commit before this moment is in this file or an earlier one
    # (the streamer proved its receiver caught up with the server at that moment). None: unproven.
    covered_until: datetime | None = None
    complete: bool = True  # False: the file's last record continues in a file not yet seen

    def to_json(self) -> dict[str, object]:
        return {
            "version": INDEX_VERSION,
            "file": self.filename,
            "end_lsn": format_lsn(self.end_lsn),
            "complete": self.complete,
            "covered_until": self.covered_until.isoformat() if self.covered_until else None,
            "commits": [[c.lsn, _micros(c.at), c.xid, c.end] for c in self.commits],
            "restore_points": [[p.lsn, p.name, p.end] for p in self.restore_points],
        }

    @classmethod
    def from_json(cls, document: object) -> FileIndex:
        if not isinstance(document, dict) or document.get("version") != INDEX_VERSION:
            raise EngineError(f"not a commit index of version {INDEX_VERSION}")
        covered = document["covered_until"]
        return cls(
            document["file"],
            tuple(Commit(lsn, _from_micros(us), xid, end) for lsn, us, xid, end in document["commits"]),
            tuple(RestorePoint(lsn, name, end) for lsn, name, end in document["restore_points"]),
            parse_lsn(document["end_lsn"]),
            datetime.fromisoformat(covered) if covered else None,
            bool(document["complete"]),
        )

    def with_coverage(self, covered_until: datetime | None) -> FileIndex:
        return FileIndex(
            self.filename, self.commits, self.restore_points, self.end_lsn, covered_until, self.complete
        )


@dataclass
class _Parsed:
    commits: list[Commit] = field(default_factory=list)
    restore_points: list[RestorePoint] = field(default_factory=list)
    last_end: int = 0
    last_was_switch: bool = False
    beyond: bool = False  # a record starting after the file was decoded


def index_file(
    pg_bin: Path, path: Path, segment: Segment, segment_size: int, next_path: Path | None = None
) -> FileIndex:
    """Index the WAL file at `path` (a segment, or a `.partial` one) holding `segment`.

    `next_path`, the following segment's file if there is one, lets a record crossing into it decode.
    """
    start, end = segment.segno * segment_size, (segment.segno + 1) * segment_size
    with tempfile.TemporaryDirectory(prefix="deskvault-walindex-", dir=path.parent) as scratch:
        # pg_waldump reads segments by their plain names: link the files under those.
        names = [segment.name(segment_size)]
        os.link(path, Path(scratch) / names[0])
        if next_path is not None:
            names.append(Segment(segment.timeline, segment.segno + 1).name(segment_size))
            os.link(next_path, Path(scratch) / names[1])
        proc = subprocess.run(
            [str(pg_bin / "pg_waldump"), "--path", scratch, *names],
            capture_output=True,
            text=True,
            # pg_waldump prints times in its own zone: the index reads them as UTC.
            env={**os.environ, "TZ": "UTC"},
            timeout=300,
        )
    parsed = parse_records(proc.stdout.splitlines(), start, end)
    if proc.returncode != 0 and not proc.stdout and not path.name.endswith(".partial"):
        # A segment being written may hold no whole record yet; a complete one always does.
        raise EngineError(f"pg_waldump cannot read {path.name}: {proc.stderr.strip()[-300:]}")
    complete = parsed.beyond or parsed.last_was_switch or parsed.last_end >= end
    return FileIndex(
        path.name,
        tuple(parsed.commits),
        tuple(parsed.restore_points),
        min(max(parsed.last_end, start), end),
        complete=complete,
    )


def parse_records(lines: Iterable[str], start: int, end: int) -> _Parsed:
    """Commits and restore points among pg_waldump's lines that start in [start, end)."""
    parsed = _Parsed()
    for line in lines:
        match = RECORD_RE.match(line)
        if match is None:
            continue
        rmgr, total, xid, lsn_text, desc = match.groups()
        lsn = parse_lsn(lsn_text)
        if lsn >= end:
            parsed.beyond = True
            break
        if lsn < start:
            continue
        parsed.last_end = record_end(lsn, int(total), end - start)
        parsed.last_was_switch = rmgr == "XLOG" and desc.startswith("SWITCH")
        if rmgr == "Transaction" and (commit := COMMIT_RE.match(desc)):
            prepared, stamp = commit.groups()
            at = datetime.fromisoformat(stamp).replace(tzinfo=UTC)
            xid = prepared or xid
            parsed.commits.append(Commit(lsn, at, int(xid), parsed.last_end))
        elif rmgr == "XLOG" and (point := RESTORE_POINT_RE.match(desc)):
            parsed.restore_points.append(RestorePoint(lsn, point.group(1), parsed.last_end))
    return parsed


def record_end(lsn: int, total: int, segment_size: int) -> int:
    """Where a record of `total` bytes starting at `lsn` ends (PostgreSQL's EndRecPtr, which replay
    reports once it has replayed the record), the page headers it spans counted."""
    position, remaining = lsn, total
    while True:
        take = min(remaining, XLOG_BLOCK - position % XLOG_BLOCK)
        position, remaining = position + take, remaining - take
        if remaining == 0:
            return -(-position // ALIGN) * ALIGN
        position += LONG_PAGE_HEADER if position % segment_size == 0 else SHORT_PAGE_HEADER


def _micros(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_micros(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
