"""Is a PostgreSQL target ready to be protected? What `deskvault check` asks of it, and what
`deskvault init` prepares on it (the WAL streamer's replication slot).

Each answer says what to change when it is not OK. The checks read the server through psql and one
replication connection, as the streamer and the backups will: a role that may log in but not replicate,
or a pg_hba.conf without a replication line, fails here rather than at the first backup.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from deskvault_core.checks import FAIL, OK, WARN, Check
from workers.engines.base import EngineError
from workers.engines.postgresql.conninfo import as_replication
from workers.engines.postgresql.server import PgServer

# The streamer's slot is named as walstream names it (deskvault_<target>).
SLOT_PREFIX = "deskvault_"
# WAL a slot holds back beyond this is worth a look: a streamer that cannot keep up, or one long gone.
SLOT_LAG_WARN_BYTES = 1 << 30


def slot_name(target: str) -> str:
    return SLOT_PREFIX + target.replace("-", "_")


def ensure_slot(server: PgServer, *, dry_run: bool) -> str:
    """The target's replication slot, created if missing (reserving no WAL until the streamer first
    connects, as pg_receivewal --create-slot makes it); says what it did or would do."""
    slot = slot_name(server.target.name)
    exists = server.query(f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'") == "1"
    if exists:
        return f"replication slot {slot} exists"
    if dry_run:
        return f"would create replication slot {slot}"
    # A streamer starting at the same moment may create it first: that is the same outcome
    server.query(
        f"SELECT pg_create_physical_replication_slot('{slot}') WHERE NOT EXISTS "
        f"(SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}')"
    )
    return f"created replication slot {slot}"


def readiness(server: PgServer) -> list[Check]:
    target = server.target
    what = f"target {target.name}"
    slot = slot_name(target.name)
    position = "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END"
    held = f"coalesce(pg_wal_lsn_diff({position}, restart_lsn)::bigint::text, '')"
    try:
        row = server.query(
            "SELECT current_setting('server_version_num'), current_setting('wal_level'), "
            "(SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), "
            f"(SELECT active::text || ',' || {held}"
            f" FROM pg_replication_slots WHERE slot_name = '{slot}')"
        )
    except EngineError as e:
        return [Check(f"{what}: reachable", FAIL, str(e), f"check targets.{target.name}.conninfo")]
    version_num, wal_level, may_replicate, slot_state = row.split("|")
    major = int(version_num) // 10000
    checks = [Check(f"{what}: reachable", OK, f"PostgreSQL {major}")]
    checks.append(_replication(server, may_replicate == "t"))
    if wal_level in ("replica", "logical"):
        checks.append(Check(f"{what}: wal_level", OK, wal_level))
    else:
        checks.append(
            Check(
                f"{what}: wal_level",
                FAIL,
                f"{wal_level}: the WAL carries too little to restore from",
                "set wal_level = replica in postgresql.conf and restart the server",
            )
        )
    checks.append(_slot(what, slot, slot_state))
    checks.append(_client_version(what, Path(target.pg_bin), major))
    checks.append(_data_directory(what, target.data_directory))
    return checks


def _replication(server: PgServer, may_replicate: bool) -> Check:
    what = f"target {server.target.name}: replication"
    role_fix = "ALTER ROLE <the conninfo's role> REPLICATION (as a superuser)"
    if not may_replicate:
        return Check(what, FAIL, "the role may not replicate: no WAL streaming, no fulls", role_fix)
    proc = subprocess.run(
        [
            str(server.bin / "psql"),
            "-X",
            "-At",
            "--no-password",
            "-d",
            as_replication(server.conninfo),
            "-c",
            "IDENTIFY_SYSTEM",
        ],
        capture_output=True,
        env=server.env,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        return Check(
            what,
            FAIL,
            f"a replication connection is refused: {reason[:300]}",
            "add a `replication` line for this role to the server's pg_hba.conf and reload it",
        )
    return Check(what, OK, "the role may replicate and a replication connection opens")


def _slot(what: str, slot: str, state: str) -> Check:
    what = f"{what}: replication slot"
    if not state:
        return Check(
            what, FAIL, f"{slot} is missing", "run `deskvault init`, then start `deskvault wal-stream`"
        )
    active, lag = state.split(",")
    held = f"{int(lag) / 2**20:.0f} MiB of WAL held" if lag else "no WAL held yet"
    if active != "true":
        return Check(
            what,
            FAIL,
            f"{slot} has no streamer connected ({held})",
            "start `deskvault wal-stream` for this target",
        )
    if lag and int(lag) > SLOT_LAG_WARN_BYTES:
        return Check(what, WARN, f"{slot}: {held}: the streamer lags", "see the wal-stream log")
    return Check(what, OK, f"{slot}, streamer connected, {held}")


def _client_version(what: str, pg_bin: Path, major: int) -> Check:
    what = f"{what}: client programs"
    program = pg_bin / "pg_basebackup"
    try:
        out = subprocess.run([str(program), "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError as e:
        return Check(
            what, FAIL, f"{program}: {e.strerror}", "set pg_bin to the server's major version's bin folder"
        )
    found = re.search(r"(\d+)(?:\.\d+)?", out)
    client = int(found.group(1)) if found else None
    if client != major:
        return Check(
            what,
            FAIL,
            f"{pg_bin} is PostgreSQL {client}, the server {major}",
            f"set pg_bin to PostgreSQL {major}'s bin folder (e.g. /usr/lib/postgresql/{major}/bin)",
        )
    return Check(what, OK, f"{pg_bin} (PostgreSQL {client})")


def _data_directory(what: str, configured: str) -> Check:
    what = f"{what}: data_directory"
    if not configured:
        return Check(
            what,
            FAIL,
            "not set: differentials copy the files changed since the full from the data directory",
            "set data_directory to the server's data directory (readable by deskvault's user)",
        )
    datadir = Path(configured)
    probe = datadir / "global" / "pg_control"
    if not os.access(probe, os.R_OK) or not os.access(datadir / "base", os.R_OK | os.X_OK):
        return Check(
            what,
            FAIL,
            f"{datadir} is not readable here ({probe} or base/)",
            "run deskvault as a user that may read the data directory, or unset data_directory",
        )
    return Check(what, OK, f"{datadir} readable (differentials and file-level fulls)")
