"""A tenant's database copied from a restored scratch copy into its live target, and put in its place.

`copy_in` streams pg_dump's custom format from the scratch copy straight into pg_restore on the target
(nothing staged on disk), in one transaction that stops at the first error, into a database made for it
with the original's encoding, locale and owner. Its comment names the request, "in progress" until
pg_restore has finished and "complete" after, so that a redelivered request tells a finished copy of
its own from a half-made one (dropped and made again) and from a database someone else made (refused).
`swap_in` renames the current database aside and the copy into its name in one transaction: the name
never points at nothing, and a failure renames nothing.

pg_restore without `--create` leaves out what belongs to the database itself rather than to its objects
(`ALTER DATABASE ... SET`, database-level grants beyond PostgreSQL's defaults): the runbook says so.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable

from workers.engines.base import EngineError
from workers.engines.postgresql.cluster import PgCluster
from workers.engines.postgresql.conninfo import with_dbname
from workers.engines.postgresql.dump import dump_stream
from workers.engines.postgresql.server import PgServer
from workers.errors import PermanentError

IN_PROGRESS, COMPLETE = "in progress", "complete"
SWAP_TRIES = 20  # with --force: terminate the sessions and rename, again while clients reconnect


def mark(request: str, state: str) -> str:
    """The comment deskvault leaves on a database it restored for `request`."""
    return f"deskvault tenant restore {request}: {state}"


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def database_note(server: PgServer, name: str) -> str | None:
    """The comment on database `name` of the target ('' if none); None if there is no such database."""
    found = server.query(
        "SELECT 'x' || coalesce(shobj_description(oid, 'pg_database'), '') FROM pg_database "
        f"WHERE datname = {literal(name)}",
        dbname="postgres",
    )
    return found[1:] if found else None


def sessions(server: PgServer, name: str) -> int:
    """Sessions connected to database `name`, other than ours."""
    return int(
        server.query(
            "SELECT count(*) FROM pg_stat_activity "
            f"WHERE datname = {literal(name)} AND pid <> pg_backend_pid()",
            dbname="postgres",
        )
    )


def copy_in(
    server: PgServer,
    scratch: PgCluster,
    database: str,
    new_name: str,
    request: str,
    on_progress: Callable[[int], None],
) -> int:
    """Copy `database` of the scratch copy into a new database `new_name` of the target; its bytes of
    dump. The new database is dropped again if anything fails."""
    properties = scratch.psql(
        "SELECT pg_encoding_to_char(encoding), datcollate, datctype, pg_get_userbyid(datdba) "
        f"FROM pg_database WHERE datname = {literal(database)}"
    ).strip()
    if not properties:
        raise PermanentError(f"at: database {database} did not exist at the moment restored")
    encoding, collate, ctype, owner = properties.split("|")
    server.query(
        f"CREATE DATABASE {ident(new_name)} TEMPLATE template0 ENCODING {literal(encoding)} "
        f"LC_COLLATE {literal(collate)} LC_CTYPE {literal(ctype)} OWNER {ident(owner)}",
        dbname="postgres",
    )
    try:
        note = f"COMMENT ON DATABASE {ident(new_name)} IS "
        server.query(note + literal(mark(request, IN_PROGRESS)), dbname="postgres")
        copied = _dump_into(server, scratch, database, new_name, on_progress)
        server.query(note + literal(mark(request, COMPLETE)), dbname="postgres")
    except BaseException:
        server.drop_database(new_name)  # nothing half-made stays on the live target
        raise
    return copied


def _dump_into(
    server: PgServer, scratch: PgCluster, database: str, new_name: str, on_progress: Callable[[int], None]
) -> int:
    command = [
        str(server.bin / "pg_restore"),
        "--exit-on-error",
        "--single-transaction",
        "--no-password",
        f"--dbname={with_dbname(server.conninfo, new_name)}",
    ]
    with tempfile.TemporaryFile() as said:  # a file, not a pipe: pg_restore's errors cannot block it
        restore = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=said, env=server.env
        )
        assert restore.stdin is not None
        copied = 0
        try:
            try:
                for chunk in dump_stream(scratch.pg_bin, scratch.conninfo, database, compress=False):
                    restore.stdin.write(chunk)
                    copied += len(chunk)
                    on_progress(copied)
            finally:
                try:
                    restore.stdin.close()
                except BrokenPipeError:
                    pass  # pg_restore stopped at an error: its exit says which
            returncode = restore.wait()
        except BrokenPipeError:
            returncode = restore.wait()
        finally:
            if restore.poll() is None:
                restore.kill()
                restore.wait()
        if returncode != 0:
            said.seek(0)
            error = said.read().decode(errors="replace").strip()[-1500:]
            raise EngineError(f"pg_restore into {new_name} on target {server.target.name} failed: {error}")
    return copied


def swap_in(server: PgServer, database: str, restored: str, aside: str, *, force: bool) -> None:
    """Rename `database` to `aside` and `restored` to `database`, at once. Refused while sessions use
    `database`, unless `force`, which terminates them (and those that reconnect meanwhile)."""
    swap = (
        f"BEGIN; ALTER DATABASE {ident(database)} RENAME TO {ident(aside)}; "
        f"ALTER DATABASE {ident(restored)} RENAME TO {ident(database)}; COMMIT;"
    )
    for _ in range(SWAP_TRIES if force else 1):
        connected = sessions(server, database)
        if connected and not force:
            raise PermanentError(
                f"mode: database {database} has {connected} session(s) connected; stop the application's "
                "use of it, or pass --force (force: true) to terminate them"
            )
        if connected:
            server.query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = {literal(database)} AND pid <> pg_backend_pid()",
                dbname="postgres",
            )
        try:
            server.query(swap, dbname="postgres")
            return
        except EngineError as e:
            if "being accessed by other users" not in str(e):
                raise
        time.sleep(0.25)
    raise EngineError(
        f"database {database} kept being reconnected to while it was put aside; nothing was renamed: "
        "try again once the application has let go of it, or with --force (force: true)"
    )
