"""The engine interface: everything handlers, restores, drills and exports ask of a database engine.

A target's `engine` setting names its engine, and `workers.engines.registry.engine_for` builds it; one
package per engine (`workers/engines/<engine>/`) holds all that is specific to it, behind one subclass
of `Engine`. An engine that lacks a layer keeps the default here, which raises `NotSupported` naming
the engine and the layer: the event is dead-lettered with that reason before anything is written.
Every engine runs the one conformance suite, `tests/integration/test_engine_conformance.py`.

Positions in an engine's log (PostgreSQL: WAL segment numbers; MariaDB: binlog file numbers) are plain
integers within a timeline, so retention, verify and inventory reason about the log without knowing
the engine.
"""

from __future__ import annotations

import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Protocol

from deskvault_core.checks import WARN, Check
from deskvault_core.config import TargetSettings
from deskvault_core.errors import DeskvaultError
from workers.errors import PermanentError
from workers.repository.objects import ObjectRepository

Manifest = dict[str, Any]


class EngineError(DeskvaultError):
    """The database engine could not back up or restore a target."""


class NotSupported(PermanentError):
    """The target's engine has no such layer; retrying cannot help."""


class Unreachable(DeskvaultError):
    """The requested point in time cannot be restored from this repository."""

    exit_code = 2


class NoBackupYet(Unreachable):
    """The target has no full backup yet: nothing of it can be restored."""


class LogGap(EngineError):
    """The archived log of the newest chain misses a file, so that chain cannot be extended."""

    def __init__(self, message: str, missing: str) -> None:
        super().__init__(message)
        self.missing = missing  # the missing file's name


@dataclass(frozen=True)
class BackupResult:
    manifest: Manifest
    created: bool  # False when a previous attempt had already committed this backup


@dataclass(frozen=True)
class LogBackupResult:
    manifest: Manifest
    summary: str  # what the archive now covers, for the job's outcome


@dataclass(frozen=True)
class Window:
    earliest: datetime
    latest: datetime
    # The restorable stretches: each full's finish to the end of the log run after it. A log gap
    # splits the window; moments in a hole between stretches are refused.
    intervals: tuple[tuple[datetime, datetime], ...] = ()

    def point_at(self, fraction: float) -> datetime:
        """The moment `fraction` (0..1) of the way through the restorable time, skipping holes."""
        lengths = [end - start for start, end in self.intervals]
        remaining = sum(lengths, timedelta()) * fraction
        for (start, _end), length in zip(self.intervals, lengths, strict=True):
            if remaining <= length:
                return start + remaining
            remaining -= length
        return self.latest


class RestorePlan(Protocol):
    """What restoring a target to a moment needs, decided before anything is downloaded."""

    target: str
    at: datetime | None  # None: the latest moment
    base: Manifest  # the full backup restored
    diff: Manifest | None  # its differential applied on top, if any
    window: Window  # what the repository can restore
    skipped: tuple[str, ...]  # damaged manifests planned around: "key: why"

    @property
    def log_files(self) -> int:
        """How many archived log files the restore replays."""
        ...


@dataclass(frozen=True)
class RestoreGoal:
    """What a restore is asked to reach: a moment (None: the latest), or one transaction's commit, a
    log position (PostgreSQL: an LSN such as 0/3000148), or a named restore point."""

    at: datetime | None = None
    xid: int | None = None
    lsn: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Relocated:
    """A part of a restore laid out outside its folder (PostgreSQL: a tablespace), and where it went."""

    what: str
    into: Path


@dataclass(frozen=True)
class RestoreResult:
    into: Path
    log_dir: Path  # where the log files replayed were laid out (gone once a started restore is promoted)
    recovery_target: datetime | None  # the moment asked for; None: the latest
    reached: datetime | None  # with start=True: the last transaction replayed
    relocated: tuple[Relocated, ...] = ()
    stop: str = ""  # exactly where recovery stops (with start=True: checked that it did)
    port: int | None = None  # with start=True: the recovered server's port
    socket_dir: Path | None = None  # with start=True: the 0700 folder of its socket, its only way in


@dataclass(frozen=True)
class LogFile:
    """One archived log file (PostgreSQL: a WAL segment, or a timeline history file)."""

    key: str
    name: str
    timeline: int
    position: int | None  # the file's number within its timeline; None for side files (history)
    partial: bool  # the file still being written, as far as it had been archived
    uploaded_at: datetime


class LogArchive(ABC):
    """A target's archived log, read once, as engine-neutral code needs it."""

    def __init__(self, prefix: str, files: list[LogFile]) -> None:
        self.prefix = prefix  # where the archive lives in the repository
        self.files = files  # in log order, side files first

    @abstractmethod
    def span(self, backup: Manifest) -> tuple[int, int, int]:
        """(timeline, first position, last position) of the log a backup needs to be consistent."""

    @abstractmethod
    def name(self, timeline: int, position: int) -> str:
        """The file name of one log position, for messages."""

    def first_gap(self, timeline: int, start: int, end: int) -> int | None:
        """The first position from `start` to `end` missing from the archive, if any.

        A partial file stands in for the last position only: it is what exists of the file being written.
        """
        have = {f.position for f in self.files if f.timeline == timeline and not f.partial}
        partial = {f.position for f in self.files if f.timeline == timeline and f.partial}
        for position in range(start, end + 1):
            if position not in have and not (position == end and position in partial):
                return position
        return None

    def companions(self, key: str) -> list[str]:
        """Objects that belong to the log file at `key` and go with it (PostgreSQL: its commit index)."""
        return []

    def gaps(self) -> list[str]:
        """Names of every position missing between archived files of one timeline."""
        complete = sorted(
            (f.timeline, f.position) for f in self.files if f.position is not None and not f.partial
        )
        return [
            self.name(a[0], n)
            for a, b in itertools.pairwise(complete)
            if a[0] == b[0]
            for n in range(a[1] + 1, b[1])
        ]


class ScratchServer(Protocol):
    """A throwaway server of the engine, reachable by deskvault alone (drills, exports as of a moment)."""

    datadir: Path
    port: int

    @property
    def conninfo(self) -> str:
        """How to connect to it, as the engine's clients spell it."""
        ...

    @property
    def log_file(self) -> Path:
        """Where the server writes its log (inside the scratch folder, so gone with it)."""
        ...


class LogStreamer(Protocol):
    """Ships a target's log into the repository continuously."""

    def run(self, stop: threading.Event) -> None:
        """Stream until `stop` (a threading.Event) is set."""
        ...


class Engine(ABC):
    """One database server (a deskvault target) as deskvault backs it up and restores it."""

    name: ClassVar[str]  # the value of `targets.<name>.engine`
    dump_format: ClassVar[str]  # what `dump_database` writes, as an export's manifest names it

    def __init__(self, target: TargetSettings) -> None:
        self.target = target

    def _lacks(self, layer: str) -> NotSupported:
        return NotSupported(f"targets.{self.target.name}.engine: {self.name} has no {layer}")

    # --- Readiness: `deskvault check` and `deskvault init` -------------------------------------

    def readiness(self) -> list[Check]:
        """Whether the target can be protected as configured: reachable, permissions, settings."""
        return [Check(f"target {self.target.name}", WARN, f"the {self.name} engine has no readiness checks")]

    def prepare(self, *, dry_run: bool) -> list[str]:
        """Create what the target needs before its first backup (idempotent); says what it did."""
        return []

    # --- Physical backups of the whole server -------------------------------------------------

    @abstractmethod
    def full_backup(
        self,
        repo: ObjectRepository,
        *,
        backup_id: str,
        job_key: str,
        event_id: str,
        on_progress: Callable[[int], None] | None = None,
    ) -> BackupResult:
        """Back up the whole server and commit its manifest; an existing commit is returned, not redone."""

    def diff_backup(
        self,
        repo: ObjectRepository,
        *,
        backup_id: str,
        full: Manifest,
        job_key: str,
        event_id: str,
        on_progress: Callable[[int], None] | None = None,
    ) -> BackupResult:
        """What changed since the full `full`, committed as a differential of it."""
        raise self._lacks("differential backups")

    def log_backup(
        self, repo: ObjectRepository, *, backup_id: str, fulls: list[Manifest], job_key: str, event_id: str
    ) -> LogBackupResult:
        """Close the current log file, wait until it is archived, prove the newest chain whole, and commit
        a log manifest (the range the archive covers since the oldest full). LogGap if the chain has a hole.
        """
        raise self._lacks("log backups")

    def log_streamer(self, repo: ObjectRepository, spool: Path, upload_interval: float) -> LogStreamer:
        """What ships the server's log into the repository as it is written (`deskvault wal-stream`)."""
        raise self._lacks("log streaming")

    def log_archive(self, repo: ObjectRepository, manifests: list[Manifest]) -> LogArchive:
        """The archived log, read with the layout the manifests record."""
        raise self._lacks("log archive")

    # --- Restores -------------------------------------------------------------------------------

    @abstractmethod
    def plan_restore(
        self, repo: ObjectRepository, at: datetime | None, *, goal: RestoreGoal | None = None
    ) -> RestorePlan:
        """What restoring to `at` (or `goal`; neither: the latest moment) needs; Unreachable says why not."""

    def restorable_by_backup(self, repo: ObjectRepository) -> dict[str, str]:
        """backup id -> the stretch a restore starting from it reaches, or why none (for `backups list`)."""
        return {}

    def mark(self, name: str) -> str:
        """Create a named restore point on the target now; returns its log position."""
        raise EngineError(f"the {self.name} engine has no named restore points")

    @abstractmethod
    def restore(
        self,
        repo: ObjectRepository,
        plan: RestorePlan,
        into: Path,
        *,
        start: bool = False,
        port: int = 0,
        relocate: Mapping[str, Path] | None = None,
        on_progress: Callable[[str], None] | None = None,
        database: str | None = None,
        throwaway: bool = False,
    ) -> RestoreResult:
        """Lay the plan out in `into` (which must be new or empty); with `start`, recover on `port` (0: a
        free one, given in the result; a busy one is refused before anything is written) and report the
        moment reached. Nothing half-restored is left behind on failure. `relocate` moves
        parts the backup kept outside its folder (PostgreSQL: tablespaces, by oid, name or old path).
        With `database` (and `start`), a copy for that one database: the engine may leave out the
        others' files, so that the restore costs what the database does. `throwaway`: a copy removed
        once read (a scratch server), which need not survive a crash of the host, so nothing is synced."""

    @abstractmethod
    def scratch_server(self, label: str) -> AbstractContextManager[ScratchServer]:
        """An empty server of this engine in a new folder named after `label` and the target, on
        a free local port; stopped and removed, folder and all, on exit."""

    @abstractmethod
    def probe(self, server: ScratchServer) -> list[str]:
        """Check a restored, running server (integrity, row counts); EngineError on a failed check."""

    # --- Tenants' databases ---------------------------------------------------------------------

    @abstractmethod
    def list_databases(self, server: ScratchServer | None = None) -> list[str]:
        """The user databases of the target (or of a scratch server), sorted."""

    @abstractmethod
    def dump_database(self, database: str, server: ScratchServer | None = None) -> Iterator[bytes]:
        """One database as the engine's logical dump (`dump_format`), streamed; EngineError after the last
        chunk if the dump failed."""

    @abstractmethod
    def drop_database(self, database: str) -> bool:
        """Drop a database of the target (disconnecting its sessions); False if it did not exist."""

    def database_note(self, database: str) -> str | None:
        """The note (comment) on a database of the target, '' if none; None if there is no such database."""
        raise self._lacks("tenant restores")

    def sessions(self, database: str) -> int:
        """How many sessions use a database of the target."""
        raise self._lacks("tenant restores")

    def copy_in(
        self,
        server: ScratchServer,
        database: str,
        new_name: str,
        request: str,
        on_progress: Callable[[int], None],
    ) -> int:
        """Copy `database` of a restored scratch server into a new database `new_name` of the target,
        noted as `request`'s (see `database_note`); its bytes. Nothing is left of it if this fails."""
        raise self._lacks("tenant restores")

    def swap_in(self, database: str, restored: str, aside: str, *, force: bool) -> None:
        """Rename `database` to `aside` and `restored` to `database` at once; refused while sessions use
        `database` unless `force`, which ends them."""
        raise self._lacks("tenant restores")
