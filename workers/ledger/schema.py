"""The control database's tables and migrations, in SQL that PostgreSQL, SQL Server and MariaDB accept.

Column types that differ between engines are written as `{ts}` and `{text}` and filled per dialect.
"""

from __future__ import annotations

DIALECT_TYPES = {
    "postgresql": {"ts": "TIMESTAMP", "text": "TEXT"},
    "mssql": {"ts": "DATETIME2", "text": "NVARCHAR(MAX)"},
    "mariadb": {"ts": "DATETIME(6)", "text": "LONGTEXT"},
}

# Each migration is applied once, in order, inside one transaction, and recorded in dv_schema_version.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE dv_jobs (
                job_key VARCHAR(200) NOT NULL PRIMARY KEY,
                pool VARCHAR(32) NOT NULL,
                event_type VARCHAR(40) NOT NULL,
                event_id VARCHAR(64) NOT NULL,
                state VARCHAR(16) NOT NULL,
                attempts INTEGER NOT NULL,
                lease_owner VARCHAR(128),
                lease_expires_at {ts},
                created_at {ts} NOT NULL,
                updated_at {ts} NOT NULL,
                finished_at {ts},
                outcome {text},
                last_error {text}
            )""",
            "CREATE INDEX dv_jobs_state ON dv_jobs (state, updated_at)",
            """CREATE TABLE dv_accounts (
                tenant VARCHAR(63) NOT NULL PRIMARY KEY,
                plan VARCHAR(16) NOT NULL,
                status VARCHAR(16) NOT NULL,
                expired_at {ts},
                trial_started_at {ts},
                updated_at {ts} NOT NULL,
                last_event_id VARCHAR(64) NOT NULL
            )""",
            """CREATE TABLE dv_account_events (
                event_id VARCHAR(64) NOT NULL PRIMARY KEY,
                tenant VARCHAR(63) NOT NULL,
                event_type VARCHAR(40) NOT NULL,
                occurred_at {ts} NOT NULL,
                recorded_at {ts} NOT NULL,
                detail {text}
            )""",
            """CREATE TABLE dv_backups (
                target VARCHAR(63) NOT NULL,
                backup_id VARCHAR(64) NOT NULL,
                kind VARCHAR(8) NOT NULL,
                manifest_key VARCHAR(400) NOT NULL,
                started_at {ts} NOT NULL,
                finished_at {ts} NOT NULL,
                start_lsn VARCHAR(32),
                stop_lsn VARCHAR(32),
                plain_bytes BIGINT NOT NULL,
                stored_bytes BIGINT NOT NULL,
                PRIMARY KEY (target, backup_id)
            )""",
            """CREATE TABLE dv_schedule (
                subject VARCHAR(140) NOT NULL,
                kind VARCHAR(16) NOT NULL,
                slot {ts} NOT NULL,
                emitted_at {ts} NOT NULL,
                idempotency_key VARCHAR(200) NOT NULL,
                PRIMARY KEY (subject, kind, slot)
            )""",
        ],
    ),
]

MIGRATIONS.append(
    (
        2,
        [
            """CREATE TABLE dv_drills (
                target VARCHAR(63) NOT NULL,
                drill_id VARCHAR(64) NOT NULL,
                point_in_time {ts} NOT NULL,
                succeeded INTEGER NOT NULL,
                duration_seconds INTEGER NOT NULL,
                finished_at {ts} NOT NULL,
                detail {text},
                PRIMARY KEY (target, drill_id)
            )""",
        ],
    )
)

MIGRATIONS.append(
    (
        3,
        [
            # Account lifecycle: when an expired account's data goes, when it went, and a legal hold.
            "ALTER TABLE dv_accounts ADD purge_after {ts}",
            "ALTER TABLE dv_accounts ADD purged_at {ts}",
            "ALTER TABLE dv_accounts ADD legal_hold INTEGER DEFAULT 0 NOT NULL",
            # Where the tenant's data lives, recorded at expiry: the accounts table may drop the tenant.
            "ALTER TABLE dv_accounts ADD target VARCHAR(63)",
            "ALTER TABLE dv_accounts ADD database_name VARCHAR(63)",
        ],
    )
)

MIGRATIONS.append(
    (
        4,
        [
            # One data key per tenant, wrapped by a key-encryption key. Legacy: tenant keys now live in
            # the repository's key store (workers/tenants/keys.py), since a restored backup of this
            # database brought a purged tenant's row back. Rows older versions wrote are moved out on
            # first use and deleted at purge; the table stays so that those rows can be found.
            """CREATE TABLE dv_tenant_keys (
                tenant VARCHAR(63) NOT NULL PRIMARY KEY,
                key_id VARCHAR(64) NOT NULL,
                kek_id VARCHAR(64) NOT NULL,
                wrapped_key VARCHAR(200) NOT NULL,
                created_at {ts} NOT NULL
            )""",
            # What each purge removed, when, and on which event: kept after the tenant is gone.
            """CREATE TABLE dv_purge_audit (
                tenant VARCHAR(63) NOT NULL PRIMARY KEY,
                event_id VARCHAR(64) NOT NULL,
                idempotency_key VARCHAR(200) NOT NULL,
                purge_after {ts} NOT NULL,
                started_at {ts} NOT NULL,
                finished_at {ts} NOT NULL,
                detail {text} NOT NULL
            )""",
        ],
    )
)

MIGRATIONS.append(
    (
        5,
        [
            # What each target occupies in the repository, measured after each full and log backup, so
            # the stored-bytes metric survives worker restarts without listing the bucket on every scrape.
            """CREATE TABLE dv_repository_usage (
                target VARCHAR(63) NOT NULL,
                area VARCHAR(16) NOT NULL,
                objects BIGINT NOT NULL,
                stored_bytes BIGINT NOT NULL,
                measured_at {ts} NOT NULL,
                PRIMARY KEY (target, area)
            )""",
        ],
    )
)

MIGRATIONS.append(
    (
        6,
        [
            # One row per tenant restore that finished (CLI or tenant-restore-requested): who asked,
            # the moment asked and the one reached, and where the data went on the live target.
            """CREATE TABLE dv_tenant_restores (
                request_id VARCHAR(200) NOT NULL PRIMARY KEY,
                tenant VARCHAR(63) NOT NULL,
                target VARCHAR(63) NOT NULL,
                mode VARCHAR(16) NOT NULL,
                requested_by VARCHAR(200) NOT NULL,
                asked_at {ts} NOT NULL,
                reached_at {ts},
                reached_xid BIGINT,
                restored_as VARCHAR(63) NOT NULL,
                put_aside_as VARCHAR(63),
                started_at {ts} NOT NULL,
                finished_at {ts} NOT NULL,
                detail {text}
            )""",
            "CREATE INDEX dv_tenant_restores_tenant ON dv_tenant_restores (tenant, finished_at)",
        ],
    )
)

SCHEMA_VERSION = MIGRATIONS[-1][0]


def statements(version_statements: list[str], dialect: str) -> list[str]:
    types = DIALECT_TYPES[dialect]
    return [s.format(**types) for s in version_statements]
