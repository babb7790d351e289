"""PostgreSQL differential backups: the files changed since the last full, under the low-level backup API.

`pg_backup_start` (with a fast checkpoint) and `pg_backup_stop` bracket the copy in one session, so the
backup label is consistent; WAL from the label's checkpoint repairs any page written while it was copied.
A file counts as unchanged only if its size and modification time equal those in the full's own
`backup_manifest` AND it was last modified before that full began -- a file touched in the second the
full started might otherwise look unchanged. Files of the full that are gone are listed as deleted.
"""

from __future__ import annotations

import calendar
import logging
import os
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyodbc

from deskvault_core.config import TargetSettings
from workers.engines.base import BackupResult, EngineError
from workers.engines.postgresql.basebackup import TABLESPACES, commit, object_entry
from workers.engines.postgresql.cluster import hand_over
from workers.engines.postgresql.conninfo import odbc_connection_string
from workers.engines.postgresql.tablespaces import Tablespace
from workers.engines.postgresql.tablespaces import link as link_tablespaces
from workers.engines.postgresql.tablespaces import write_map as write_tablespace_map
from workers.engines.postgresql.targuard import TarGuard, checked_path
from workers.engines.postgresql.untar import unpack_tar
from workers.engines.postgresql.walnames import parse_lsn
from workers.errors import PermanentError
from workers.repository import catalog
from workers.repository.objects import ObjectRepository

log = logging.getLogger(__name__)

READ_SIZE = 1024 * 1024
# Like pg_basebackup: folders whose contents a backup never needs, and files it never copies.
SKIP_CONTENTS = {
    "pg_wal",
    "pg_dynshmem",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
}
SKIP_FILES = {
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "recovery.signal",
    "standby.signal",
    "backup_manifest",
}
SKIP_ANYWHERE = {"pg_internal.init"}  # relation cache files, rebuilt at start


def diff_backup(
    target: TargetSettings,
    repo: ObjectRepository,
    *,
    backup_id: str,
    full: dict[str, Any],
    job_key: str,
    event_id: str,
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
    known = _full_files(repo.get_json(full["file_list"]))
    full_started = datetime.fromisoformat(full["started_at"]).timestamp()
    datadir = Path(target.data_directory)

    try:
        session = pyodbc.connect(odbc_connection_string(target.conninfo), autocommit=True, timeout=30)
    except pyodbc.Error as e:
        raise EngineError(f"target {target.name}: cannot open a backup session ({e.args[-1]})") from None
    try:
        cur = session.cursor()
        started_at = datetime.now(UTC)
        start_lsn = cur.execute("SELECT pg_backup_start(?, true)::text", f"deskvault {backup_id}").fetchone()[
            0
        ]
        timeline = cur.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()[0]
        _check_directory_is_the_servers(target, datadir, start_lsn, int(timeline))
        spaces = [
            {"oid": int(oid), "name": name, "location": location}
            for oid, name, location in cur.execute(TABLESPACES).fetchall()
        ]
        changed, deleted = _compare(datadir, known, full_started)
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
        data_key = catalog.attempt_prefix(target.name, backup_id) + "changed.tar.dv"
        stored = repo.put_stream(data_key, _tar_stream(datadir, changed), on_progress=on_progress)
        stop_lsn, label, spcmap = cur.execute(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
        ).fetchone()
    finally:
        session.close()  # closing the session also ends a backup that failed midway
    manifest = {
        "format": catalog.MANIFEST_FORMAT,
        "target": target.name,
        "engine": "postgresql",
        "kind": "diff",
        "backup_id": backup_id,
        "parent": full["backup_id"],
        "server_version_num": full.get("server_version_num"),
        "wal_segment_size": full.get("wal_segment_size"),
        "timeline": int(timeline),
        "start_lsn": start_lsn,
        "stop_lsn": stop_lsn,
        "started_at": catalog.iso(started_at),
        "finished_at": catalog.iso(datetime.now(UTC)),
        "job_key": job_key,
        "event_id": event_id,
        "backup_label": label,
        "tablespace_map": spcmap or "",
        "tablespaces": spaces,
        "changed_files": len(changed),
        "deleted_files": deleted,
        "objects": [object_entry("changed.tar", stored)],
        "plain_size": stored.plain_size,
        "stored_size": stored.stored_size,
    }
    return commit(repo, catalog.manifest_key(target.name, backup_id), manifest)


def _check_directory_is_the_servers(
    target: TargetSettings, datadir: Path, start_lsn: str, timeline: int
) -> None:
    """Refuse to copy files from a data directory the server does not run on (a copy that was promoted
    elsewhere, the old primary's folder after a switch): the differential would restore as corrupt.

    pg_backup_start has just checkpointed, so the server's own pg_control records that checkpoint.
    """
    proc = subprocess.run(
        [str(Path(target.pg_bin) / "pg_controldata"), "-D", str(datadir)],
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C"},
        timeout=60,
    )
    fields = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    redo = fields.get("Latest checkpoint's REDO location", "").strip()
    on = fields.get("Latest checkpoint's TimeLineID", "").strip()
    if proc.returncode != 0 or not redo or parse_lsn(redo) < parse_lsn(start_lsn) or on != str(timeline):
        raise PermanentError(
            f"targets.{target.name}.data_directory ({datadir}) is not the data directory of the server at "
            f"targets.{target.name}.conninfo: the server checkpointed at {start_lsn} on timeline {timeline}, "
            f"the folder's last checkpoint is {redo or '?'} on timeline {on or '?'} "
            f"({proc.stderr.strip()[:200] or 'pg_controldata'}); point data_directory at the server's folder"
        )


def _full_files(pg_manifest: Any) -> dict[str, tuple[int, int]]:
    """path -> (size, modification time in whole seconds) from PostgreSQL's backup_manifest."""
    files = {}
    for entry in pg_manifest["Files"]:
        stamp = time.strptime(entry["Last-Modified"], "%Y-%m-%d %H:%M:%S %Z")
        files[entry["Path"]] = (int(entry["Size"]), calendar.timegm(stamp))
    return files


def _compare(
    datadir: Path, known: dict[str, tuple[int, int]], full_started: float
) -> tuple[list[tuple[str, int]], list[str]]:
    changed: list[tuple[str, int]] = []
    present = set()
    for path, size, mtime in _walk(datadir):
        present.add(path)
        before = known.get(path)
        if before is None or before != (size, int(mtime)) or mtime >= full_started - 1:
            changed.append((path, size))
    deleted = sorted(p for p in known if p not in present and not _skipped(p))
    return changed, deleted


def _walk(datadir: Path) -> Iterator[tuple[str, int, float]]:
    """Every file a backup copies, as `path, size, mtime`; a tablespace's under `pg_tblspc/<oid>/`."""
    yield from _walk_tree(datadir, datadir)
    links = datadir / "pg_tblspc"
    for entry in sorted(os.scandir(links), key=lambda e: e.name) if links.is_dir() else ():
        if entry.is_symlink():  # os.walk does not follow links; an in-place tablespace was walked above
            yield from _walk_tree(datadir, links / entry.name)


def _walk_tree(datadir: Path, top: Path) -> Iterator[tuple[str, int, float]]:
    for root, dirs, files in os.walk(top):
        rel_root = os.path.relpath(root, datadir)
        if rel_root in SKIP_CONTENTS:
            dirs.clear()
            continue
        dirs[:] = [d for d in dirs if d != "pgsql_tmp"]
        for name in files:
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if _skipped(rel):
                continue
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue  # dropped while we looked: the WAL replays the drop
            if stat.S_ISREG(st.st_mode):
                yield rel, st.st_size, st.st_mtime


def _skipped(path: str) -> bool:
    top, _, _ = path.partition("/")
    name = path.rsplit("/", 1)[-1]
    return top in SKIP_CONTENTS or path in SKIP_FILES or name in SKIP_ANYWHERE or name.startswith("pgsql_tmp")


def _tar_stream(datadir: Path, files: list[tuple[str, int]]) -> Iterator[bytes]:
    """A tar of `files`, each cut or zero-padded to the size it had when listed (like pg_basebackup)."""
    for path, size in files:
        info = tarfile.TarInfo(path)
        info.size = size
        info.mode = 0o600
        info.mtime = int(time.time())
        yield info.tobuf(format=tarfile.GNU_FORMAT)
        left = size
        try:
            with open(datadir / path, "rb") as f:
                while left and (chunk := f.read(min(READ_SIZE, left))):
                    left -= len(chunk)
                    yield chunk
        except FileNotFoundError:
            pass  # dropped during the backup: zeros now, the WAL replays the drop
        if left:
            yield bytes(left)
        if size % tarfile.BLOCKSIZE:
            yield bytes(tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE)
    yield bytes(2 * tarfile.BLOCKSIZE)


def apply_diff(
    repo: ObjectRepository, diff: dict[str, Any], into: Path, spaces: list[Tablespace] | None = None
) -> None:
    """Lay a differential over a restored full: changed files, deletions, and the diff's backup label.

    Files under `pg_tblspc/<oid>/` land in the tablespace's restored folder through the link the full's
    restore made; `spaces` must name every tablespace of the full and of the differential.
    """
    spaces = spaces or []
    link_tablespaces(into, spaces)  # a tablespace created after the full has no link yet
    (entry,) = diff["objects"]
    plain = repo.get_stream(entry["key"], expect_sha256=entry["sha256"], expect_size=entry["plain_size"])
    # A differential holds files only: no link, and nothing but the tablespaces' links on the way.
    unpack_tar(plain, into, TarGuard(f"{diff['backup_id']}/{entry['name']}"))
    for path in diff["deleted_files"]:
        (into / checked_path(path, f"differential {diff['backup_id']}: deleted file")).unlink(missing_ok=True)
    (into / "backup_label").write_text(diff["backup_label"])
    write_tablespace_map(into, spaces)  # the diff's own map names the old folders
    (into / "backup_manifest").unlink(missing_ok=True)  # the full's; it does not describe this state
    for space in spaces:
        hand_over(space.into)
