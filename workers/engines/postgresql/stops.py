"""Where a restore stops: a moment, a transaction, an LSN or a named restore point, resolved to a record.

Every goal becomes one WAL position recovery stops right after (`recovery_target_lsn`, inclusive), found
in the commit indexes of the archived WAL run a backup replays (`commitindex`): a moment T resolves to
the last commit at or before T, or to the backup's consistency point when none follows it. A restore
then knows exactly what it must reach, and checks that it did.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from workers.engines.postgresql.commitindex import Commit, FileIndex, RestorePoint, index_file, index_key
from workers.engines.postgresql.walarchive import WalEntry
from workers.engines.postgresql.walnames import format_lsn, parse_lsn
from workers.repository.errors import ObjectNotFound
from workers.repository.objects import ObjectRepository

# Files uploaded this long before T hold only commits before T, whatever the clocks of the database
# host and the object store say: a search for T starts reading indexes there.
CLOCK_MARGIN = timedelta(seconds=60)


@dataclass(frozen=True)
class Stop:
    """Recovery stops right after the record at `lsn`, or, with `consistent`, once consistent at it."""

    lsn: int
    what: str  # for people: which commit, restore point, LSN or consistency point
    end: int | None = None  # where the record stopped after ends: replay must end exactly there
    commit: Commit | None = None  # the commit stopped after
    consistent: bool = False  # the backup's own consistency point (recovery_target = 'immediate')

    @property
    def lsn_text(self) -> str:
        return format_lsn(self.lsn)


def consistency_stop(backup: dict) -> Stop:
    return Stop(
        parse_lsn(backup["stop_lsn"]),
        f"the consistency point of backup {backup['backup_id']} (LSN {backup['stop_lsn']}): no commit "
        "follows it up to then",
        consistent=True,
    )


class IndexReader:
    """The commit indexes of a run of archived WAL files, each read once; a file archived without one
    (by an older deskvault) is downloaded and indexed here."""

    def __init__(self, repo: ObjectRepository, target: str, pg_bin: Path, segment_size: int) -> None:
        self.repo = repo
        self.target = target
        self.pg_bin = pg_bin
        self.segment_size = segment_size
        self._read: dict[str, FileIndex] = {}

    def get(self, run: list[WalEntry], i: int) -> FileIndex:
        entry = run[i]
        if entry.key not in self._read:
            try:
                index = FileIndex.from_json(self.repo.get_json(index_key(self.target, entry.filename)))
            except ObjectNotFound:
                index = self._index_download(run, i)
            self._read[entry.key] = index
        return self._read[entry.key]

    def _index_download(self, run: list[WalEntry], i: int) -> FileIndex:
        entry, following = run[i], (run[i + 1] if i + 1 < len(run) else None)
        assert entry.segment is not None
        with tempfile.TemporaryDirectory(prefix="deskvault-walindex-") as scratch:
            paths = []
            for e in (entry, following):
                if e is None:
                    paths.append(None)
                    continue
                path = Path(scratch) / e.filename
                with path.open("wb") as f:
                    for chunk in self.repo.get_stream(e.key):
                        f.write(chunk)
                paths.append(path)
            return index_file(self.pg_bin, paths[0], entry.segment, self.segment_size, paths[1])

    def coverage(self, run: list[WalEntry], since: datetime) -> datetime:
        """Up to when the run holds every commit: the newest proof of the streamer, or the last commit."""
        best = since
        for i in range(len(run) - 1, -1, -1):
            index = self.get(run, i)
            if index.covered_until is not None:
                best = max(best, index.covered_until)
            if index.commits:
                return max(best, index.commits[-1].at)
            if best > since:
                return best
        return best

    def last_commit_by(self, run: list[WalEntry], at: datetime) -> tuple[int, Commit] | None:
        """The last commit at or before `at` in the run (by LSN), with the position of its file."""
        first = next((i for i, e in enumerate(run) if e.uploaded_at >= at - CLOCK_MARGIN), len(run) - 1)
        found: tuple[int, Commit] | None = None
        for i in range(max(first, 0), len(run)):
            index = self.get(run, i)
            earlier = [c for c in index.commits if c.at <= at]
            if earlier:
                found = (i, earlier[-1])
            if len(earlier) < len(index.commits):
                return found  # later files hold later commits
        if found is None:
            for i in range(first - 1, -1, -1):  # the moment lies in a quiet stretch: look further back
                if commits := self.get(run, i).commits:
                    return i, commits[-1]
        return found

    def find_commit(self, run: list[WalEntry], xid: int) -> tuple[int, Commit] | None:
        for i in range(len(run)):
            for commit in self.get(run, i).commits:
                if commit.xid == xid:
                    return i, commit
        return None

    def find_restore_point(self, run: list[WalEntry], name: str) -> tuple[int, RestorePoint] | None:
        """The newest restore point called `name` in the run, with the position of its file."""
        for i in range(len(run) - 1, -1, -1):
            for point in reversed(self.get(run, i).restore_points):
                if point.name == name:
                    return i, point
        return None


def file_of(run: list[WalEntry], lsn: int, segment_size: int) -> int | None:
    """The position in the run of the segment holding `lsn`."""
    segno = lsn // segment_size
    return next((i for i, e in enumerate(run) if e.segment is not None and e.segment.segno == segno), None)
