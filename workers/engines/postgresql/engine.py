"""The PostgreSQL engine: the engine interface, each method a few lines over the modules beside it."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from deskvault_core.checks import Check
from deskvault_core.config import TargetSettings
from deskvault_core.errors import DeskvaultError
from workers.engines.base import (
    BackupResult,
    Engine,
    LogBackupResult,
    Manifest,
    RestoreGoal,
    RestorePlan,
    RestoreResult,
    ScratchServer,
)
from workers.engines.postgresql import basebackup, copyin, diff, filebackup, logbackup, parts, readiness
from workers.engines.postgresql import restore as point_in_time
from workers.engines.postgresql.cluster import PgCluster, free_port
from workers.engines.postgresql.dump import dump_stream
from workers.engines.postgresql.probe import probe
from workers.engines.postgresql.server import PgServer
from workers.engines.postgresql.walarchive import WalArchive, wal_archive
from workers.repository.objects import ObjectRepository

if TYPE_CHECKING:
    from workers.engines.postgresql.walstream import WalStreamer

log = logging.getLogger(__name__)

USER_DATABASES = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"


class PostgresEngine(Engine):
    """A PostgreSQL cluster: file-level fulls in parallel parts (or pg_basebackup's), file-level
    differentials, WAL streamed by
    pg_receivewal, point-in-time restore through recovery, pg_dump per database."""

    name = "postgresql"
    dump_format = "pg_dump custom format (pg_restore reads it)"

    def __init__(self, target: TargetSettings) -> None:
        super().__init__(target)
        self.server = PgServer(target)
        self.pg_bin = Path(target.pg_bin)

    def full_backup(
        self,
        repo: ObjectRepository,
        *,
        backup_id: str,
        job_key: str,
        event_id: str,
        on_progress: Callable[[int], None] | None = None,
    ) -> BackupResult:
        if self._full_from_files():
            return filebackup.full_from_files(
                self.target,
                repo,
                backup_id=backup_id,
                job_key=job_key,
                event_id=event_id,
                parallel=self._parallel(),
                on_progress=on_progress,
            )
        return basebackup.full_backup(
            self.server,
            repo,
            backup_id=backup_id,
            job_key=job_key,
            event_id=event_id,
            on_progress=on_progress,
        )

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
        return diff.diff_backup(
            self.target,
            repo,
            backup_id=backup_id,
            full=full,
            job_key=job_key,
            event_id=event_id,
            parallel=self._parallel(),
            on_progress=on_progress,
        )

    def _full_from_files(self) -> bool:
        """Whether fulls read the data directory (see `full_method`): a standby's goes through
        pg_basebackup, which knows how to end a backup taken there."""
        method = self.target.full_method
        if method == "auto":
            if not self.target.data_directory:
                return False
            return self.server.query("SELECT pg_is_in_recovery()").strip() == "f"
        return method == "files"

    def _parallel(self) -> int:
        return self.target.backup_parallel or parts.default_parallel()

    def log_backup(
        self, repo: ObjectRepository, *, backup_id: str, fulls: list[Manifest], job_key: str, event_id: str
    ) -> LogBackupResult:
        return logbackup.log_backup(
            self.server, repo, backup_id=backup_id, fulls=fulls, job_key=job_key, event_id=event_id
        )

    def log_streamer(self, repo: ObjectRepository, spool: Path, upload_interval: float) -> WalStreamer:
        # Imported here: the streamer brings the pools' metrics (prometheus, dramatiq), a fifth of a
        # second of every restore command's start from a cold disk
        from workers.engines.postgresql.walstream import WalStreamer

        return WalStreamer(self.target, repo, spool, upload_interval)

    def log_archive(self, repo: ObjectRepository, manifests: list[Manifest]) -> WalArchive:
        return wal_archive(repo, self.target.name, manifests)

    def plan_restore(
        self, repo: ObjectRepository, at: datetime | None, *, goal: RestoreGoal | None = None
    ) -> point_in_time.RestorePlan:
        return point_in_time.plan_restore(repo, self.target.name, at, goal=goal, pg_bin=self.pg_bin)

    def restorable_by_backup(self, repo: ObjectRepository) -> dict[str, str]:
        return point_in_time.restorable_by_backup(repo, self.target.name, self.pg_bin)

    def mark(self, name: str) -> str:
        return self.server.create_restore_point(name)

    def readiness(self) -> list[Check]:
        return readiness.readiness(self.server)

    def prepare(self, *, dry_run: bool) -> list[str]:
        return [readiness.ensure_slot(self.server, dry_run=dry_run)]

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
        if not isinstance(plan, point_in_time.RestorePlan):
            raise TypeError(f"a PostgreSQL restore takes its own plan, not {type(plan).__name__}")
        return point_in_time.restore(
            repo,
            plan,
            into,
            start=start,
            port=port,
            pg_bin=self.pg_bin,
            tablespaces=relocate,
            on_progress=on_progress or log.info,
            database=database,
            throwaway=throwaway,
        )

    @contextmanager
    def scratch_server(self, label: str) -> Iterator[PgCluster]:
        scratch = Path(tempfile.mkdtemp(prefix=f"deskvault-{label}-{self.target.name}-"))
        scratch.chmod(0o755)  # the postgres user runs the restored server inside it
        cluster = PgCluster(scratch / "data", free_port(), self.pg_bin)
        try:
            yield cluster
        except BaseException:
            try:
                cluster.destroy()
            except DeskvaultError as e:
                log.warning("%s", e)  # cleanup: the failure that got here is the one to report
            raise
        else:
            cluster.destroy()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def probe(self, server: ScratchServer) -> list[str]:
        return probe(_cluster(server))

    def list_databases(self, server: ScratchServer | None = None) -> list[str]:
        if server is None:
            return self.server.query(USER_DATABASES, dbname="postgres").split()
        return _cluster(server).psql(USER_DATABASES).split()

    def dump_database(self, database: str, server: ScratchServer | None = None) -> Iterator[bytes]:
        conninfo = self.target.conninfo if server is None else server.conninfo
        return dump_stream(self.pg_bin, conninfo, database)

    def drop_database(self, database: str) -> bool:
        return self.server.drop_database(database)

    def database_note(self, database: str) -> str | None:
        return copyin.database_note(self.server, database)

    def sessions(self, database: str) -> int:
        return copyin.sessions(self.server, database)

    def copy_in(
        self,
        server: ScratchServer,
        database: str,
        new_name: str,
        request: str,
        on_progress: Callable[[int], None],
    ) -> int:
        return copyin.copy_in(self.server, _cluster(server), database, new_name, request, on_progress)

    def swap_in(self, database: str, restored: str, aside: str, *, force: bool) -> None:
        copyin.swap_in(self.server, database, restored, aside, force=force)


def _cluster(server: ScratchServer) -> PgCluster:
    if not isinstance(server, PgCluster):
        raise TypeError(f"the PostgreSQL engine needs its own scratch server, not {type(server).__name__}")
    return server
