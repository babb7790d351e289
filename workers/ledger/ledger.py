"""The idempotency ledger: who is doing which job, and which jobs are done, in the control database.

Reached through pyodbc so the same code runs on PostgreSQL (psqlODBC), SQL Server or MariaDB. Every
timestamp is written by this process from an injectable clock (naive UTC in the database), so tests can
move time without sleeping and no SQL depends on an engine's date functions.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyodbc

from deskvault_core.errors import DeskvaultError
from workers.ledger.schema import MIGRATIONS, SCHEMA_VERSION, statements

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


class LedgerError(DeskvaultError):
    """The control database could not be used."""


class AccountStateConflict(LedgerError):
    """An account event does not apply to the account's current status (e.g. reactivating a purged one)."""

    def __init__(self, tenant: str, status: str, purged_at: datetime | None) -> None:
        self.tenant, self.status, self.purged_at = tenant, status, purged_at
        super().__init__(f"tenant {tenant} is {status}")


class PurgeRefused(LedgerError):
    """A purge-due event does not apply to the account as it stands; the message says why."""


class _AccountRowAppeared(Exception):
    """Another transaction created the account row between this one's UPDATE and SELECT."""


class LeaseLost(LedgerError):
    """Another worker took this job over; this worker must stop writing its results."""


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to take a job: `claimed`, `duplicate` (already done) or `busy`."""

    status: str
    attempts: int = 0
    # For `busy`: when the current holder's lease runs out.
    lease_expires_at: datetime | None = None


@dataclass(frozen=True)
class Job:
    job_key: str
    pool: str
    event_type: str
    event_id: str
    state: str
    attempts: int
    lease_owner: str | None
    updated_at: datetime
    outcome: str | None
    last_error: str | None


TENANT_RESTORE_COLUMNS = (
    "request_id",
    "tenant",
    "target",
    "mode",
    "requested_by",
    "asked_at",
    "reached_at",
    "reached_xid",
    "restored_as",
    "put_aside_as",
    "started_at",
    "finished_at",
    "detail",
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _db(dt: datetime | None) -> datetime | None:
    """To the database: naive UTC."""
    if dt is None:
        return None
    return dt.astimezone(UTC).replace(tzinfo=None)


class _TextTimestamps:
    """A cursor that hands MariaDB its timestamps as text: bound as timestamps, MariaDB's ODBC driver
    drops their fractions of a second (DATETIME(6) keeps them from text)."""

    def __init__(self, cursor: pyodbc.Cursor) -> None:
        self._cursor = cursor

    def execute(self, sql: str, *params: Any) -> pyodbc.Cursor:
        return self._cursor.execute(sql, *map(_text_if_time, params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._cursor.executemany(sql, [tuple(map(_text_if_time, row)) for row in rows])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


def _text_if_time(value: Any) -> Any:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(value, datetime) else value


def _py(dt: datetime | None) -> datetime | None:
    """From the database: aware UTC."""
    return None if dt is None else dt.replace(tzinfo=UTC)


class Ledger:
    """Jobs keyed by the event's idempotency key, claimed atomically through a primary key."""

    def __init__(self, odbc: str, *, clock: Clock = utcnow, lease_seconds: int = 120) -> None:
        self._odbc = odbc
        self._clock = clock
        self.lease = timedelta(seconds=lease_seconds)
        self._local = threading.local()
        self.dialect = ""

    def now(self) -> datetime:
        return self._clock()

    # -- connections ---------------------------------------------------------------------------------
    def _connection(self) -> pyodbc.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = pyodbc.connect(self._odbc, autocommit=False, timeout=10)
            except pyodbc.Error as e:
                raise LedgerError(
                    f"cannot connect to the control database ({_describe(e)}); check [control_db] odbc "
                    "and that the database server is running"
                ) from None
            self._local.conn = conn
            self.dialect = self.dialect or _dialect(conn)
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[pyodbc.Cursor]:
        conn = self._connection()
        try:
            cursor = conn.cursor()
            yield _TextTimestamps(cursor) if self.dialect == "mariadb" else cursor
            conn.commit()
        except pyodbc.IntegrityError:
            conn.rollback()
            raise
        except pyodbc.Error as e:
            # The connection may be broken; drop it so the next call reconnects.
            self._drop_connection()
            raise LedgerError(f"control database error: {_describe(e)}") from None
        except BaseException:
            with contextlib.suppress(pyodbc.Error):
                conn.rollback()
            raise

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(pyodbc.Error):
                conn.close()

    def close(self) -> None:
        self._drop_connection()

    # -- schema --------------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Create or upgrade deskvault's tables; safe to run from several processes at once, and to run
        again after one stopped midway.

        Processes migrate one at a time (a lock of the server's own, held by this session), so a second
        one finds the work done. MariaDB commits each DDL statement by itself, so a migration that
        stopped midway leaves some of its tables behind, unrecorded: run again, a statement whose object
        exists is passed over, and the migration is recorded once all of it is there.
        """
        if self.schema_version() >= SCHEMA_VERSION:
            return self.schema_version()
        with self._migration_lock():
            current = self.schema_version()
            for version, version_statements in MIGRATIONS:
                if version <= current:
                    continue
                try:
                    with self.transaction() as cur:
                        if version == 1:
                            self._ddl(
                                cur, "CREATE TABLE dv_schema_version (version INTEGER NOT NULL PRIMARY KEY)"
                            )
                        for statement in statements(version_statements, self.dialect):
                            self._ddl(cur, statement)
                        cur.execute("INSERT INTO dv_schema_version (version) VALUES (?)", version)
                    log.info("control database migrated to schema version %d", version)
                except (LedgerError, pyodbc.IntegrityError):
                    # Where no lock serializes migrations (SQL Server, whose DDL is transactional),
                    # another process may have applied this one at the same moment.
                    if self.schema_version() < version:
                        raise
        return self.schema_version()

    def _ddl(self, cur: pyodbc.Cursor, statement: str) -> None:
        try:
            cur.execute(statement)
        except pyodbc.Error as e:
            if self.dialect != "mariadb" or not _already_there(e):
                raise
            log.info(
                "control database: %s... is already there (an earlier migration stopped midway)",
                statement[:60],
            )

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """This session holds the server's migration lock for the block (PostgreSQL, MariaDB)."""
        lock, unlock = _MIGRATION_LOCKS.get(self.dialect, (None, None))
        if lock is None:
            yield
            return
        with self.transaction() as cur:
            got = cur.execute(lock).fetchone()
        if got is not None and got[0] in (0, None):  # GET_LOCK's answer when it timed out
            raise LedgerError("another process has held the control database's migration lock for 2 minutes")
        try:
            yield
        finally:
            with contextlib.suppress(LedgerError), self.transaction() as cur:
                cur.execute(unlock).fetchall()

    def schema_version(self) -> int:
        conn = self._connection()
        cur = conn.cursor()
        try:
            row = cur.execute("SELECT MAX(version) FROM dv_schema_version").fetchone()
            conn.commit()
            return int(row[0] or 0)
        except pyodbc.Error:
            conn.rollback()
            return 0

    # -- jobs ----------------------------------------------------------------------------------------
    def claim(self, job_key: str, *, pool: str, event_type: str, event_id: str, owner: str) -> Claim:
        """Take the job unless it is done or another live worker holds its lease."""
        now = self._clock()
        expires = now + self.lease
        try:
            with self.transaction() as cur:
                cur.execute(
                    "INSERT INTO dv_jobs (job_key, pool, event_type, event_id, state, attempts, lease_owner,"
                    " lease_expires_at, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, 'running', 1, ?, ?, ?, ?)",
                    job_key,
                    pool,
                    event_type,
                    event_id,
                    owner,
                    _db(expires),
                    _db(now),
                    _db(now),
                )
            return Claim("claimed", attempts=1)
        except pyodbc.IntegrityError:
            pass  # the key exists: done, running elsewhere, or failed and ready to retry
        with self.transaction() as cur:
            cur.execute(
                "UPDATE dv_jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?,"
                " lease_expires_at = ?, updated_at = ?, event_id = ?"
                " WHERE job_key = ? AND (state = 'failed' OR (state = 'running' AND lease_expires_at < ?))",
                owner,
                _db(expires),
                _db(now),
                event_id,
                job_key,
                _db(now),
            )
            took_over = cur.rowcount == 1
            row = cur.execute(
                "SELECT state, attempts, lease_expires_at FROM dv_jobs WHERE job_key = ?", job_key
            ).fetchone()
        if took_over:
            return Claim("claimed", attempts=int(row[1]))
        if row[0] == "done":
            return Claim("duplicate", attempts=int(row[1]))
        return Claim("busy", attempts=int(row[1]), lease_expires_at=_py(row[2]))

    def renew(self, job_key: str, owner: str) -> None:
        """Extend the lease; raises LeaseLost if another worker has taken the job over."""
        now = self._clock()
        with self.transaction() as cur:
            cur.execute(
                "UPDATE dv_jobs SET lease_expires_at = ?, updated_at = ?"
                " WHERE job_key = ? AND lease_owner = ? AND state = 'running'",
                _db(now + self.lease),
                _db(now),
                job_key,
                owner,
            )
            if cur.rowcount != 1:
                raise LeaseLost(f"job {job_key}: lease lost to another worker")

    def complete(self, job_key: str, owner: str, outcome: str) -> None:
        self._finish(job_key, owner, "done", outcome=outcome)

    def fail(self, job_key: str, owner: str, error: str) -> None:
        self._finish(job_key, owner, "failed", error=error)

    def _finish(
        self, job_key: str, owner: str, state: str, *, outcome: str | None = None, error: str | None = None
    ) -> None:
        now = self._clock()
        with self.transaction() as cur:
            cur.execute(
                "UPDATE dv_jobs SET state = ?, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?,"
                " finished_at = ?, outcome = COALESCE(?, outcome), last_error = ?"
                " WHERE job_key = ? AND lease_owner = ? AND state = 'running'",
                state,
                _db(now),
                _db(now),
                outcome,
                error,
                job_key,
                owner,
            )
            if cur.rowcount != 1:
                raise LeaseLost(f"job {job_key}: lease lost before it could be marked {state}")

    def job(self, job_key: str) -> Job | None:
        with self.transaction() as cur:
            row = cur.execute(
                "SELECT job_key, pool, event_type, event_id, state, attempts, lease_owner, updated_at,"
                " outcome, last_error FROM dv_jobs WHERE job_key = ?",
                job_key,
            ).fetchone()
        if row is None:
            return None
        return Job(row[0], row[1], row[2], row[3], row[4], int(row[5]), row[6], _py(row[7]), row[8], row[9])

    def running_jobs(self) -> dict[str, int]:
        """pool -> jobs claimed and not finished (read through the state index: dv_jobs only grows)."""
        with self.transaction() as cur:
            rows = cur.execute(
                "SELECT pool, COUNT(*) FROM dv_jobs WHERE state = 'running' GROUP BY pool"
            ).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def failed_jobs_since(self, since: datetime) -> dict[str, int]:
        """pool -> jobs whose newest attempt failed at or after `since` (a later success clears them)."""
        with self.transaction() as cur:
            rows = cur.execute(
                "SELECT pool, COUNT(*) FROM dv_jobs WHERE state = 'failed' AND updated_at >= ? GROUP BY pool",
                _db(since),
            ).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    # -- lifecycle records -----------------------------------------------------------------------------
    def record_account_event(
        self,
        *,
        tenant: str,
        event_type: str,
        event_id: str,
        occurred_at: datetime,
        plan: str | None,
        status: str,
        expired_at: datetime | None,
        trial_started_at: datetime | None,
        purge_after: datetime | None,
        allowed_from: tuple[str, ...],
        detail: str,
        location: tuple[str, str] | None = None,
    ) -> bool:
        """Record an account event once and move the account to `status`; False if recorded before.

        The move happens only from a status in `allowed_from` (or for an account not seen before);
        otherwise nothing is written and AccountStateConflict says what the account's status is.
        """
        now = self._clock()
        target, database = location or (None, None)
        # The columns both the UPDATE and the INSERT write, in their order in each.
        values = (
            status,
            _db(expired_at),
            _db(trial_started_at),
            _db(purge_after),
            _db(now),
            event_id,
            target,
            database,
        )
        event_row = (event_id, tenant, event_type, _db(occurred_at), _db(now), detail)
        # Two first events of a tenant race to insert its account row: the loser goes round again and
        # then finds the row to update.
        for _ in range(3):
            try:
                with self.transaction() as cur:
                    self._apply_account_event(cur, tenant, plan, values, event_row, allowed_from)
                return True
            except _AccountRowAppeared:
                continue
            except pyodbc.IntegrityError:
                if self._account_event_recorded(event_id):
                    return False
        raise LedgerError(f"account of tenant {tenant}: concurrent updates kept colliding; retry the event")

    @staticmethod
    def _apply_account_event(
        cur: pyodbc.Cursor,
        tenant: str,
        plan: str | None,
        values: tuple[Any, ...],
        event_row: tuple[Any, ...],
        allowed_from: tuple[str, ...],
    ) -> None:
        cur.execute(
            "INSERT INTO dv_account_events (event_id, tenant, event_type, occurred_at, recorded_at, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            *event_row,
        )
        placeholders = ", ".join("?" for _ in allowed_from)
        updated = cur.execute(
            "UPDATE dv_accounts SET plan = COALESCE(?, plan), status = ?, expired_at = ?,"
            " trial_started_at = ?, purge_after = ?, updated_at = ?, last_event_id = ?,"
            " target = COALESCE(?, target), database_name = COALESCE(?, database_name)"
            f" WHERE tenant = ? AND status IN ({placeholders})",
            plan,
            *values,
            tenant,
            *allowed_from,
        ).rowcount
        if updated == 1:
            return
        row = cur.execute("SELECT status, purged_at FROM dv_accounts WHERE tenant = ?", tenant).fetchone()
        if row is not None and row[0] in allowed_from:
            raise _AccountRowAppeared  # committed since the UPDATE looked
        if row is not None:
            # Raising rolls back the event row too: a refused event leaves no trace here.
            raise AccountStateConflict(tenant, row[0], _py(row[1]))
        cur.execute(
            "INSERT INTO dv_accounts (tenant, plan, status, expired_at, trial_started_at, purge_after,"
            " updated_at, last_event_id, target, database_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            tenant,
            plan or "unknown",
            *values,
        )

    def _account_event_recorded(self, event_id: str) -> bool:
        with self.transaction() as cur:
            return (
                cur.execute("SELECT 1 FROM dv_account_events WHERE event_id = ?", event_id).fetchone()
                is not None
            )

    def account(self, tenant: str) -> dict[str, Any] | None:
        with self.transaction() as cur:
            row = cur.execute(
                "SELECT tenant, plan, status, expired_at, trial_started_at, last_event_id, purge_after,"
                " purged_at, legal_hold, target, database_name FROM dv_accounts WHERE tenant = ?",
                tenant,
            ).fetchone()
        if row is None:
            return None
        return {
            "tenant": row[0],
            "plan": row[1],
            "status": row[2],
            "expired_at": _py(row[3]),
            "trial_started_at": _py(row[4]),
            "last_event_id": row[5],
            "purge_after": _py(row[6]),
            "purged_at": _py(row[7]),
            "legal_hold": bool(row[8]),
            "target": row[9],
            "database": row[10],
        }

    def account_statuses(self) -> dict[str, str]:
        """tenant -> status, for every account the ledger knows (others are active)."""
        with self.transaction() as cur:
            rows = cur.execute("SELECT tenant, status FROM dv_accounts").fetchall()
        return {r[0]: r[1] for r in rows}

    # -- account lifecycle: purges, legal holds, tenant keys ------------------------------------------
    def due_purges(self, now: datetime) -> list[tuple[str, datetime]]:
        """Expired tenants whose purge date has passed and that no legal hold keeps: (tenant, date)."""
        return self._expired_accounts("purge_after <= ?", now)

    def upcoming_purges(self, now: datetime, notice: timedelta) -> list[tuple[str, datetime]]:
        """Expired tenants, under no legal hold, whose purge falls within `notice` from `now`."""
        return self._expired_accounts("purge_after > ? AND purge_after <= ?", now, now + notice)

    def _expired_accounts(self, condition: str, *moments: datetime) -> list[tuple[str, datetime]]:
        with self.transaction() as cur:
            rows = cur.execute(
                "SELECT tenant, purge_after FROM dv_accounts WHERE status = 'expired' AND legal_hold = 0"
                f" AND {condition} ORDER BY purge_after, tenant",
                *(_db(m) for m in moments),
            ).fetchall()
        return [(row[0], _py(row[1])) for row in rows]  # type: ignore[misc]

    def begin_purge(self, tenant: str, purge_after: datetime) -> str:
        """Mark a due purge as running: "started", "resumed" (it was running) or "purged" (it is done).

        Raises PurgeRefused saying why when the account is not due: unknown, active again, under a legal
        hold, not yet due, or due on another date than the event says.
        """
        now = self._clock()
        with self.transaction() as cur:
            started = cur.execute(
                "UPDATE dv_accounts SET status = 'purging', updated_at = ? WHERE tenant = ?"
                " AND status = 'expired' AND legal_hold = 0 AND purge_after = ? AND purge_after <= ?",
                _db(now),
                tenant,
                _db(purge_after),
                _db(now),
            ).rowcount
            row = cur.execute(
                "SELECT status, purge_after, legal_hold FROM dv_accounts WHERE tenant = ?", tenant
            ).fetchone()
        if started:
            return "started"
        if row is None:
            raise PurgeRefused(f"tenant: {tenant} has no recorded expiry; there is nothing to purge")
        status, due, held = row[0], _py(row[1]), bool(row[2])
        if status == "purged":
            return "purged"
        if status == "purging":
            return "resumed"
        if status == "active":
            raise PurgeRefused(f"tenant: {tenant} is active again (reactivated); nothing is purged")
        if held:
            raise PurgeRefused(f"tenant: {tenant} is under a legal hold; release it to let the purge run")
        if due != purge_after:
            raise PurgeRefused(
                f"purge_after: the account's purge date is now {_iso(due)}, not {_iso(purge_after)} "
                "(it expired again since); the sweeper emits a purge-due for the new date"
            )
        raise PurgeRefused(f"purge_after: {_iso(due)} has not come yet (now {_iso(now)})")

    def finish_purge(
        self,
        tenant: str,
        *,
        event_id: str,
        idempotency_key: str,
        purge_after: datetime,
        started_at: datetime,
        detail: str,
    ) -> None:
        """Record the purge as done, with its audit record, in one transaction."""
        now = self._clock()
        with self.transaction() as cur:
            exists = cur.execute("SELECT 1 FROM dv_purge_audit WHERE tenant = ?", tenant).fetchone()
            if exists is None:
                cur.execute(
                    "INSERT INTO dv_purge_audit (tenant, event_id, idempotency_key, purge_after, started_at,"
                    " finished_at, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    tenant,
                    event_id,
                    idempotency_key,
                    _db(purge_after),
                    _db(started_at),
                    _db(now),
                    detail,
                )
            cur.execute(
                "UPDATE dv_accounts SET status = 'purged', purged_at = ?, updated_at = ?"
                " WHERE tenant = ? AND status = 'purging'",
                _db(now),
                _db(now),
                tenant,
            )

    def purge_audit(self, tenant: str) -> dict[str, Any] | None:
        with self.transaction() as cur:
            row = cur.execute(
                "SELECT event_id, idempotency_key, purge_after, started_at, finished_at, detail"
                " FROM dv_purge_audit WHERE tenant = ?",
                tenant,
            ).fetchone()
        if row is None:
            return None
        keys = ("event_id", "idempotency_key", "purge_after", "started_at", "finished_at", "detail")
        values = (row[0], row[1], _py(row[2]), _py(row[3]), _py(row[4]), row[5])
        return dict(zip(keys, values, strict=True))

    def set_legal_hold(self, tenant: str, held: bool) -> None:
        """Place or lift a legal hold; lifting lets the sweeper emit the tenant's purge again."""
        now = self._clock()
        with self.transaction() as cur:
            updated = cur.execute(
                "UPDATE dv_accounts SET legal_hold = ?, updated_at = ? WHERE tenant = ?",
                int(held),
                _db(now),
                tenant,
            ).rowcount
            if updated == 0:
                cur.execute(
                    "INSERT INTO dv_accounts (tenant, plan, status, updated_at, last_event_id, legal_hold)"
                    " VALUES (?, 'unknown', 'active', ?, 'legal-hold', ?)",
                    tenant,
                    _db(now),
                    int(held),
                )
            if not held:
                # A purge-due refused while the hold stood was dead-lettered: let the sweeper emit anew.
                cur.execute(
                    "DELETE FROM dv_schedule WHERE subject = ? AND kind = 'purge'", f"tenant:{tenant}"
                )

    # Tenant keys live in the repository's key store (workers/tenants/keys.py), where a purge really
    # destroys them: a restored control-database backup would bring back a key kept here. These read and
    # delete the keys older versions wrote into dv_tenant_keys, which are moved out on first use.
    def legacy_tenant_key(self, tenant: str) -> tuple[str, str, str] | None:
        """(key id, wrapping key id, wrapped key in base64) of a tenant key an older version stored here."""
        with self.transaction() as cur:
            row = cur.execute(
                "SELECT key_id, kek_id, wrapped_key FROM dv_tenant_keys WHERE tenant = ?", tenant
            ).fetchone()
        return (row[0], row[1], row[2]) if row is not None else None

    def legacy_tenant_keys_by_kek(self) -> dict[str, int]:
        """How many legacy tenant keys each key-encryption key wraps (none before the schema exists)."""
        if self.schema_version() == 0:
            return {}
        with self.transaction() as cur:
            rows = cur.execute("SELECT kek_id, COUNT(*) FROM dv_tenant_keys GROUP BY kek_id").fetchall()
        return {str(kek_id): int(n) for kek_id, n in rows}

    def forget_legacy_tenant_key(self, tenant: str) -> bool:
        """Delete a tenant's legacy key row (moved to the key store, or purged); False if it had none."""
        with self.transaction() as cur:
            return bool(cur.execute("DELETE FROM dv_tenant_keys WHERE tenant = ?", tenant).rowcount)

    # -- catalog index (rebuildable from the bucket) ---------------------------------------------------
    def record_backup(
        self,
        *,
        target: str,
        backup_id: str,
        kind: str,
        manifest_key: str,
        started_at: datetime,
        finished_at: datetime,
        start_lsn: str | None,
        stop_lsn: str | None,
        plain_bytes: int,
        stored_bytes: int,
    ) -> None:
        try:
            with self.transaction() as cur:
                cur.execute(
                    "INSERT INTO dv_backups (target, backup_id, kind, manifest_key, started_at, finished_at,"
                    " start_lsn, stop_lsn, plain_bytes, stored_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    target,
                    backup_id,
                    kind,
                    manifest_key,
                    _db(started_at),
                    _db(finished_at),
                    start_lsn,
                    stop_lsn,
                    plain_bytes,
                    stored_bytes,
                )
        except pyodbc.IntegrityError:
            pass  # already indexed: a redelivery after the manifest was written

    def forget_backups(self, target: str, backup_ids: list[str]) -> None:
        """Drop deleted backups from the index, so it keeps describing what the repository holds."""
        with self.transaction() as cur:
            for backup_id in backup_ids:
                cur.execute("DELETE FROM dv_backups WHERE target = ? AND backup_id = ?", target, backup_id)

    def newest_backup_time(self, target: str, kind: str) -> datetime | None:
        with self.transaction() as cur:
            row = cur.execute(
                "SELECT MAX(finished_at) FROM dv_backups WHERE target = ? AND kind = ?", target, kind
            ).fetchone()
        return _py(row[0]) if row else None

    # -- restore drills -----------------------------------------------------------------------------------
    def record_drill(
        self,
        *,
        target: str,
        drill_id: str,
        point_in_time: datetime,
        succeeded: bool,
        duration_seconds: int,
        detail: str,
    ) -> None:
        try:
            with self.transaction() as cur:
                cur.execute(
                    "INSERT INTO dv_drills (target, drill_id, point_in_time, succeeded, duration_seconds,"
                    " finished_at, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    target,
                    drill_id,
                    _db(point_in_time),
                    int(succeeded),
                    duration_seconds,
                    _db(self._clock()),
                    detail,
                )
        except pyodbc.IntegrityError:
            pass  # recorded by an earlier attempt

    def drills(self, target: str) -> list[dict[str, Any]]:
        with self.transaction() as cur:
            rows = cur.execute(
                "SELECT drill_id, point_in_time, succeeded, duration_seconds, finished_at, detail"
                " FROM dv_drills WHERE target = ? ORDER BY finished_at",
                target,
            ).fetchall()
        return [
            {
                "drill_id": r[0],
                "point_in_time": _py(r[1]),
                "succeeded": bool(r[2]),
                "duration_seconds": int(r[3]),
                "finished_at": _py(r[4]),
                "detail": r[5],
            }
            for r in rows
        ]

    # -- tenant restores -----------------------------------------------------------------------------
    def record_tenant_restore(self, record: dict[str, Any]) -> None:
        """Record a finished tenant restore (the keys of `TENANT_RESTORE_COLUMNS`); once per request."""
        columns = ", ".join(TENANT_RESTORE_COLUMNS)
        marks = ", ".join("?" for _ in TENANT_RESTORE_COLUMNS)
        values = [_db(v) if isinstance(v, datetime) else v for v in map(record.get, TENANT_RESTORE_COLUMNS)]
        try:
            with self.transaction() as cur:
                cur.execute(f"INSERT INTO dv_tenant_restores ({columns}) VALUES ({marks})", *values)
        except pyodbc.IntegrityError:
            pass  # recorded by an earlier attempt of the same request

    def tenant_restores(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's finished restores, oldest first."""
        with self.transaction() as cur:
            rows = cur.execute(
                f"SELECT {', '.join(TENANT_RESTORE_COLUMNS)} FROM dv_tenant_restores WHERE tenant = ?"
                " ORDER BY finished_at",
                tenant,
            ).fetchall()
        found = [dict(zip(TENANT_RESTORE_COLUMNS, r, strict=True)) for r in rows]
        return [{c: _py(v) if isinstance(v, datetime) else v for c, v in f.items()} for f in found]

    # -- scheduler -----------------------------------------------------------------------------------
    def was_emitted(self, subject: str, kind: str, slot: datetime) -> bool:
        with self.transaction() as cur:
            row = cur.execute(
                "SELECT 1 FROM dv_schedule WHERE subject = ? AND kind = ? AND slot = ?",
                subject,
                kind,
                _db(slot),
            ).fetchone()
        return row is not None

    def mark_emitted(self, subject: str, kind: str, slot: datetime, idempotency_key: str) -> None:
        """Remember that a slot's event was published (a second scheduler's mark is a no-op)."""
        try:
            with self.transaction() as cur:
                cur.execute(
                    "INSERT INTO dv_schedule (subject, kind, slot, emitted_at, idempotency_key)"
                    " VALUES (?, ?, ?, ?, ?)",
                    subject,
                    kind,
                    _db(slot),
                    _db(self._clock()),
                    idempotency_key,
                )
        except pyodbc.IntegrityError:
            pass

    def emitted_subjects(self, kind: str, slot: datetime) -> set[str]:
        """Every subject whose `kind` event for `slot` was already published."""
        with self.transaction() as cur:
            rows = cur.execute(
                "SELECT subject FROM dv_schedule WHERE kind = ? AND slot = ?", kind, _db(slot)
            ).fetchall()
        return {r[0] for r in rows}

    def mark_emitted_many(self, kind: str, slot: datetime, marks: list[tuple[str, str]]) -> None:
        """mark_emitted for many (subject, idempotency key) pairs, in one transaction."""
        now = _db(self._clock())
        try:
            with self.transaction() as cur:
                cur.executemany(
                    "INSERT INTO dv_schedule (subject, kind, slot, emitted_at, idempotency_key)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(subject, kind, _db(slot), now, key) for subject, key in marks],
                )
        except pyodbc.IntegrityError:  # another scheduler marked some of them: mark the rest one by one
            for subject, key in marks:
                self.mark_emitted(subject, kind, slot, key)

    # -- state for metrics and `deskvault status` --------------------------------------------------------
    def newest_backups(self) -> dict[tuple[str, str], datetime]:
        """(target, kind) -> when its newest indexed backup finished."""
        with self.transaction() as cur:
            rows = cur.execute(
                "SELECT target, kind, MAX(finished_at) FROM dv_backups GROUP BY target, kind"
            ).fetchall()
        return {(r[0], r[1]): _py(r[2]) for r in rows}  # type: ignore[misc]

    def newest_drills(self) -> dict[str, dict[str, Any]]:
        """target -> its newest drill (`finished_at`, `succeeded`) and newest passed one (`passed_at`)."""
        with self.transaction() as cur:
            rows = cur.execute(
                "SELECT target, finished_at, succeeded FROM dv_drills ORDER BY target, finished_at"
            ).fetchall()
        drills: dict[str, dict[str, Any]] = {}
        for target, finished_at, succeeded in rows:
            row = drills.setdefault(target, {"passed_at": None})
            row["finished_at"], row["succeeded"] = _py(finished_at), bool(succeeded)
            if succeeded:
                row["passed_at"] = _py(finished_at)
        return drills

    def record_usage(self, target: str, area: str, objects: int, stored_bytes: int) -> None:
        with self.transaction() as cur:
            cur.execute("DELETE FROM dv_repository_usage WHERE target = ? AND area = ?", target, area)
            cur.execute(
                "INSERT INTO dv_repository_usage (target, area, objects, stored_bytes, measured_at)"
                " VALUES (?, ?, ?, ?, ?)",
                target,
                area,
                objects,
                stored_bytes,
                _db(self._clock()),
            )

    def repository_usage(self) -> list[tuple[str, str, int, int]]:
        """(target, area, objects, stored bytes) as last measured."""
        with self.transaction() as cur:
            rows = cur.execute(
                "SELECT target, area, objects, stored_bytes FROM dv_repository_usage ORDER BY target, area"
            ).fetchall()
        return [(r[0], r[1], int(r[2]), int(r[3])) for r in rows]

    def purge_state(self, now: datetime) -> dict[str, Any]:
        """Counts of expired tenants waiting, due, held; and the date of the oldest purge still due."""
        with self.transaction() as cur:
            rows = cur.execute(
                "SELECT status, legal_hold, purge_after FROM dv_accounts"
                " WHERE status IN ('expired', 'purging')"
            ).fetchall()
        state: dict[str, Any] = {"pending": 0, "due": 0, "held": 0, "oldest_due": None}
        for status, held, purge_after in rows:
            when = _py(purge_after)
            if held and status == "expired":
                state["held"] += 1
            elif status == "purging" or (when is not None and when <= now):
                state["due"] += 1
                if when is not None and (state["oldest_due"] is None or when < state["oldest_due"]):
                    state["oldest_due"] = when
            else:
                state["pending"] += 1
        return state


def _iso(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%dT%H:%M:%SZ}" if moment is not None else "(none)"


# Session-level locks that serialize migrations: (take, release). pg_advisory_lock waits as long as it
# takes; GET_LOCK answers 0 after its timeout.
_MIGRATION_LOCK_ID = 0x64766D67  # "dvmg"
_MIGRATION_LOCKS = {
    "postgresql": (
        f"SELECT pg_advisory_lock({_MIGRATION_LOCK_ID})",
        f"SELECT pg_advisory_unlock({_MIGRATION_LOCK_ID})",
    ),
    "mariadb": ("SELECT GET_LOCK('deskvault_migrate', 120)", "SELECT RELEASE_LOCK('deskvault_migrate')"),
}
VERSION_TABLE = "CREATE TABLE dv_schema_version (version INTEGER NOT NULL PRIMARY KEY)"
# MariaDB's errors for a table, column or index that exists already.
_MARIADB_ALREADY_THERE = ("(1050)", "(1060)", "(1061)")


def _already_there(e: pyodbc.Error) -> bool:
    return any(code in str(e) for code in _MARIADB_ALREADY_THERE)


def _dialect(conn: pyodbc.Connection) -> str:
    name = conn.getinfo(pyodbc.SQL_DBMS_NAME).lower()
    if "postgres" in name:
        return "postgresql"
    if "sql server" in name:
        return "mssql"
    if "maria" in name or "mysql" in name:
        return "mariadb"
    raise LedgerError(f"unsupported control database {name!r}; use PostgreSQL, SQL Server or MariaDB")


def _describe(e: pyodbc.Error) -> str:
    # pyodbc errors carry (sqlstate, message); the connection string (and any password) is never in them.
    return " ".join(str(a) for a in e.args[1:] or e.args)[:500]
