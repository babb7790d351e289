"""PostgreSQL differential backups: the files changed since the last full, under the low-level backup API.

`pg_backup_start` (with a fast checkpoint) and `pg_backup_stop` bracket the copy in one session, so the
backup label is consistent; WAL from the label's checkpoint repairs any page written while it was copied.
A file counts as unchanged only if its size and modification time equal those in the full's file list
AND it was last modified before that full began -- a file touched in the second the full started might
otherwise look unchanged. Files of the full that are gone are listed as deleted. The changed files are
stored as parts, like a full read from the data directory (see `parts`); differentials from before
parts hold one tar, `changed.tar`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deskvault_core.config import TargetSettings
from workers.engines.base import BackupResult
from workers.engines.postgresql import datafiles, parts
from workers.engines.postgresql.basebackup import commit
from workers.engines.postgresql.cluster import hand_over
from workers.engines.postgresql.datafiles import DataFile
from workers.engines.postgresql.filebackup import backup_session
from workers.engines.postgresql.tablespaces import Tablespace
from workers.engines.postgresql.tablespaces import link as link_tablespaces
from workers.engines.postgresql.tablespaces import write_map as write_tablespace_map
from workers.engines.postgresql.targuard import TarGuard, checked_path
from workers.engines.postgresql.untar import unpack_tar
from workers.errors import PermanentError
from workers.repository import catalog
from workers.repository.objects import ObjectRepository

log = logging.getLogger(__name__)


def diff_backup(
    target: TargetSettings,
    repo: ObjectRepository,
    *,
    backup_id: str,
    full: dict[str, Any],
    job_key: str,
    event_id: str,
    parallel: int = 1,
    on_progress: Callable[[int], None] | None = None,
) -> BackupResult:
    manifest_key = catalog.manifest_key(target.name, backup_id)
    if repo.exists(manifest_key):
        return BackupResult(repo.get_json(manifest_key), created=False)
    if not target.data_directory:
        raise PermanentError(
            f"targets.{target.name}.data_directory is not set: differential backups copy changed files "
            "from the data directory, so deskvault must be able to read it"
        )
    if not full.get("file_list"):
        raise PermanentError(f"full backup {full['backup_id']} has no file list; take a new full backup")
    full_started = datetime.fromisoformat(full["started_at"]).timestamp()
    datadir = Path(target.data_directory)
    prefix = catalog.attempt_prefix(target.name, backup_id)

    started_at = datetime.now(UTC)
    with backup_session(target, backup_id) as session:
        files, folders = datafiles.walk(datadir)
        changed, deleted = _compare(files, datafiles.listed_files(repo, full), full_started)
        log.info(
            "diff %s/%s: %d changed files, %d deleted since full %s",
            target.name,
            backup_id,
            len(changed),
            len(deleted),
            full["backup_id"],
        )
        if aborted := repo.abort_uploads(catalog.backup_prefix(target.name, backup_id)):
            log.info("diff %s: aborted %d upload(s) left by an earlier attempt", backup_id, aborted)
        planned = parts.plan(changed, folders)
        objects = parts.store_all(repo, datadir, planned, prefix, parallel=parallel, on_progress=on_progress)
        session.stop()
    manifest = session.manifest(
        target.name,
        "diff",
        backup_id,
        started_at,
        objects,
        parent=full["backup_id"],
        server_version_num=full.get("server_version_num"),
        wal_segment_size=full.get("wal_segment_size"),
        job_key=job_key,
        event_id=event_id,
        changed_files=len(changed),
        deleted_files=deleted,
    )
    return commit(repo, manifest_key, manifest)


def _compare(
    files: list[DataFile], known: Iterator[tuple[str, int, int]], full_started: float
) -> tuple[list[DataFile], list[str]]:
    """The files changed since the full (or new), and the full's files that are gone.

    Both lists are walked side by side in path order, so the full's list is never held whole.
    """
    changed: list[DataFile] = []
    deleted: list[str] = []
    before = next(known, None)
    for f in sorted(files, key=lambda f: f.path):
        while before is not None and before[0] < f.path:
            if not datafiles.skipped(before[0]):
                deleted.append(before[0])
            before = next(known, None)
        listed = before is not None and before[0] == f.path
        if not listed or before[1:] != (f.size, int(f.mtime)) or f.mtime >= full_started - 1:
            changed.append(f)
        if listed:
            before = next(known, None)
    while before is not None:
        if not datafiles.skipped(before[0]):
            deleted.append(before[0])
        before = next(known, None)
    return changed, deleted


def apply_diff(
    repo: ObjectRepository,
    diff: dict[str, Any],
    into: Path,
    spaces: list[Tablespace] | None = None,
    *,
    parallel: int = 1,
    keeps: Callable[[str], bool] | None = None,
) -> None:
    """Lay a differential over a restored full: changed files, deletions, and the diff's backup label;
    with `keeps`, only the changed files of the groups it keeps (see `subset`).

    Files under `pg_tblspc/<oid>/` land in the tablespace's restored folder through the link the full's
    restore made; `spaces` must name every tablespace of the full and of the differential.
    """
    spaces = spaces or []
    link_tablespaces(into, spaces)  # a tablespace created after the full has no link yet
    archive = diff["backup_id"]
    if diff.get("layout") == parts.LAYOUT:
        for space in spaces:
            space.into.mkdir(mode=0o700, parents=True, exist_ok=True)
            hand_over(space.into)
        hand_over(into)  # the links and folders above are root's until now
        parts.restore_all(repo, parts.kept(diff["objects"], keeps), into, archive, parallel=parallel)
    else:  # one archive: `subset_for` never splits it
        (entry,) = diff["objects"]
        plain = repo.get_stream(entry["key"], expect_sha256=entry["sha256"], expect_size=entry["plain_size"])
        # A differential holds files only: no link, and nothing but the tablespaces' links on the way.
        unpack_tar(plain, into, TarGuard(f"{archive}/{entry['name']}"))
    for path in diff["deleted_files"]:
        (into / checked_path(path, f"differential {archive}: deleted file")).unlink(missing_ok=True)
    (into / "backup_label").write_text(diff["backup_label"])
    write_tablespace_map(into, spaces)  # the diff's own map names the old folders
    (into / "backup_manifest").unlink(missing_ok=True)  # the full's; it does not describe this state
    for space in spaces:
        hand_over(space.into)
