"""One database of a backup restored alone: its own parts, the cluster's, and nothing of the others.

A backup in parts groups files by database folder (see `parts.group_of`), so a tenant's restore can
download only its database's parts, the cluster's (shared catalogs, pg_wal) and those of `postgres`,
where deskvault's own sessions connect (to follow recovery, read the database's properties). The
server starts without the template databases (only CREATE DATABASE reads them), and the copy makes none.

Replay then meets WAL records for the other databases' files, which are missing. A record carrying a
full-page image recreates its page, but some name a page without one (a vacuum marking pages
all-visible on a cluster without checksums), and PostgreSQL stops recovery on those with "WAL contains
references to invalid pages" -- empty placeholder files (pgBackRest's `--db-include`) fail the same way,
as "page N ... is uninitialized" (pgBackRest issue 1782; tests/integration/test_database_subset.py).
So the copy recovers with `ignore_invalid_pages = on`, which turns each such reference into a WARNING
naming the relation, and the restore then fails if any warning names a file of a database it kept: for
those, an invalid page would be damage, not a skipped database. The copy is for dumping that one
database; the others in it are unusable, and it is removed afterwards.

A backup that cannot be split (pg_basebackup's single tar, or one from before the `databases` list)
is restored whole: `subset_for` says why.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deskvault_core.errors import DeskvaultError
from workers.engines.postgresql import parts

KEPT_ALONGSIDE = ("postgres",)  # where deskvault's sessions on the copy connect
ALONE_SETTINGS = (
    "ignore_invalid_pages = on",  # see above: each reference is a WARNING, checked by `check_replayed`
    "autovacuum = off",  # it would visit the databases left out
)
INVALID_PAGE_RE = re.compile(r"WARNING:\s+page \d+ of relation (\S+) (?:is uninitialized|does not exist)")


@dataclass(frozen=True)
class DatabaseSubset:
    """The databases (by oid) whose files a restore lays out."""

    oids: frozenset[int]

    def keeps(self, group: str) -> bool:
        """Whether a part group (`cluster`, `pg_wal`, `base/<oid>`, `pg_tblspc/<spc>/<version>/<oid>`)
        is laid out."""
        if not group.startswith(("base/", "pg_tblspc/")):
            return True
        return int(group.rsplit("/", 1)[1]) in self.oids


def subset_for(backups: Iterable[dict[str, Any] | None], database: str) -> DatabaseSubset | str:
    """The subset that restoring `database` from this full (and differential) lays out, or why the
    backups cannot be split.

    The database's oid in each backup is kept (a database dropped and made again between the full and
    the differential has two); one made after the backup replay starts from comes from the WAL alone.
    """
    oids: set[int] = set()
    for backup in (b for b in backups if b is not None):
        if backup.get("layout") != parts.LAYOUT:
            return f"backup {backup['backup_id']} is one archive (pg_basebackup's), not parts"
        if "databases" not in backup:
            return f"backup {backup['backup_id']} does not list its databases"
        oids |= {d["oid"] for d in backup["databases"] if d["name"] in (*KEPT_ALONGSIDE, database)}
    return DatabaseSubset(frozenset(oids))


def skipped_bytes(backup: dict[str, Any], subset: DatabaseSubset) -> int:
    """Plain bytes of the parts `subset` leaves out of `backup`."""
    laid_out = parts.kept(backup["objects"], subset.keeps)
    return sum(o["plain_size"] for o in backup["objects"]) - sum(o["plain_size"] for o in laid_out)


def check_replayed(log_file: Path, subset: DatabaseSubset) -> int:
    """Fail if replay met an invalid page in a file the restore laid out; the number of invalid-page
    references it ignored in the databases left out."""
    ignored = 0
    with log_file.open(errors="replace") as log:
        for line in log:
            if (found := INVALID_PAGE_RE.search(line)) is None:
                continue
            relation = found.group(1)
            if subset.keeps(parts.group_of(relation)):
                raise DeskvaultError(
                    f"replay found an invalid page in {relation}, a file this restore laid out from the "
                    f"backup (see {log_file}); the backup or its WAL is damaged: run `deskvault backups "
                    "verify` and restore from another backup"
                )
            ignored += 1
    return ignored
