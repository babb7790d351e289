"""PostgreSQL physical backups: pg_basebackup's tars streamed into the repository, and back.

pg_basebackup (`-F tar -X fetch`) writes one tar per tablespace into a spool folder: `<oid>.tar` for
each tablespace, then `base.tar` with the data directory, the WAL needed to make it consistent, the
backup label and `tablespace_map`, then PostgreSQL's own `backup_manifest`. `tarspool` reads each tar
as it grows and frees what it has read, so the spool holds only what the upload has not taken yet.
A temporary replication slot (`walhold`) keeps the WAL on the server until the copy ends. Each tar
flows through zstd and AES-256-GCM into a multipart upload of its own, one object per tablespace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workers.engines.base import BackupResult, EngineError
from workers.engines.postgresql import parts
from workers.engines.postgresql.cluster import hand_over
from workers.engines.postgresql.server import PgServer
from workers.engines.postgresql.tablespaces import Tablespace
from workers.engines.postgresql.tablespaces import layout as tablespaces_layout
from workers.engines.postgresql.tablespaces import link as link_tablespaces
from workers.engines.postgresql.targuard import TarGuard
from workers.engines.postgresql.tarspool import TarSpool
from workers.engines.postgresql.untar import unpack_tar
from workers.engines.postgresql.walhold import wal_held
from workers.repository import catalog
from workers.repository.errors import ObjectNotFound
from workers.repository.objects import ObjectRepository, StoredObject
from workers.repository.streams import counted

log = logging.getLogger(__name__)

TABLESPACES = (
    "SELECT oid, spcname, pg_tablespace_location(oid) FROM pg_tablespace "
    "WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY oid"
)
START_RE = re.compile(r"write-ahead log start point: ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)")
END_RE = re.compile(r"write-ahead log end point: ([0-9A-F]+/[0-9A-F]+)")


def full_backup(
    server: PgServer,
    repo: ObjectRepository,
    *,
    backup_id: str,
    job_key: str,
    event_id: str,
    on_progress: Callable[[int], None] | None = None,
) -> BackupResult:
    """Stream pg_basebackup's tars (one per tablespace) into the repository and commit the full's manifest."""
    manifest_key = catalog.manifest_key(server.target.name, backup_id)
    if repo.exists(manifest_key):
        # An earlier attempt committed this backup and died before the ledger heard of it.
        return BackupResult(repo.get_json(manifest_key), created=False)

    server_version = int(server.query("SHOW server_version_num"))
    segment_size = server.wal_segment_size()
    started_at = datetime.now(UTC)
    if aborted := repo.abort_uploads(catalog.backup_prefix(server.target.name, backup_id)):
        log.info("backup %s: aborted %d upload(s) left by an earlier attempt", backup_id, aborted)
    spaces = tablespaces(server)
    prefix = catalog.attempt_prefix(server.target.name, backup_id)
    spool = Path(tempfile.mkdtemp(prefix=f"deskvault-full-{server.target.name}-"))
    try:
        with wal_held(server.target.name, server.target.conninfo):
            tars = spool / "tars"
            run = _BaseBackupRun(basebackup_command(server, backup_id, tars), server.env, tars)
            objects, stored_before = [], 0

            def progress(done: int) -> None:
                if on_progress is not None:
                    on_progress(stored_before + done)

            # Closed at once on a failed upload (a lost lease too): that kills pg_basebackup.
            with contextlib.closing(run.archives()) as archives:
                for name, chunks in archives:
                    stored = repo.put_stream(prefix + name + ".dv", chunks, on_progress=progress)
                    stored_before += stored.plain_size
                    objects.append(object_entry(name, stored))
            run.check()
            # PostgreSQL's own backup_manifest lists every file with its size and time: the differential
            # layer compares the data directory against it.
            pg_manifest = run.tars.manifest()
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    by_name = {o["name"]: o for o in objects}
    for space in spaces:
        entry = by_name.get(f"{space['oid']}.tar")
        if entry is None:
            raise EngineError(
                f"backup {backup_id}: pg_basebackup wrote no archive for tablespace {space['name']} "
                f"(oid {space['oid']}); not committing, a retry takes a new copy"
            )
        space["key"] = entry["key"]
    unknown = set(by_name) - {"base.tar"} - {f"{t['oid']}.tar" for t in spaces}
    if unknown or "base.tar" not in by_name:
        raise EngineError(
            f"backup {backup_id}: pg_basebackup wrote {sorted(by_name)}, not base.tar and one tar per "
            "tablespace (was a tablespace created meanwhile?); not committing, a retry takes a new copy"
        )
    file_list_key = None
    if pg_manifest is not None:
        file_list_key = prefix + "files.dv"
        repo.put_json(file_list_key, json.loads(pg_manifest))
    finished_at = datetime.now(UTC)

    manifest = {
        "format": catalog.MANIFEST_FORMAT,
        "target": server.target.name,
        "engine": "postgresql",
        "kind": "full",
        "backup_id": backup_id,
        "parent": None,
        "server_version_num": server_version,
        "wal_segment_size": segment_size,
        "timeline": run.timeline,
        "start_lsn": run.start_lsn,
        "stop_lsn": run.stop_lsn,
        "started_at": catalog.iso(started_at),
        "finished_at": catalog.iso(finished_at),
        "job_key": job_key,
        "event_id": event_id,
        "file_list": file_list_key,
        # Each tablespace's archive is an object of its own, in `objects` too (retention keeps those).
        "tablespaces": spaces,
        "objects": objects,
        "plain_size": sum(o["plain_size"] for o in objects),
        "stored_size": sum(o["stored_size"] for o in objects),
    }
    return commit(repo, manifest_key, manifest)


def tablespaces(server: PgServer) -> list[dict[str, Any]]:
    """The target's tablespaces besides the data directory's own: oid, name and location."""
    rows = server.query(TABLESPACES)
    spaces = []
    for row in rows.splitlines():
        oid, name, location = row.split("|", 2)
        spaces.append({"oid": int(oid), "name": name, "location": location})
    return spaces


def basebackup_command(server: PgServer, backup_id: str, folder: Path) -> list[str]:
    """pg_basebackup's command line: the conninfo without its password, which travels in the environment.

    It writes one tar per tablespace into `folder` (see `tarspool`); they are read as they grow.
    """
    return [
        str(server.bin / "pg_basebackup"),
        "--dbname",
        server.conninfo,
        "--pgdata",
        str(folder),
        "--format",
        "tar",
        "--no-sync",  # each tar is read back at once and deleted: flushing it to disk buys nothing
        "--wal-method",
        "fetch",
        "--checkpoint",
        "fast",
        "--label",
        f"deskvault {backup_id}",
        "--no-password",
        "--verbose",
        *([f"--max-rate={server.target.full_max_rate_mib}M"] if server.target.full_max_rate_mib else []),
    ]


def object_entry(name: str, stored: StoredObject) -> dict[str, Any]:
    """How a manifest lists one of its data objects."""
    return {
        "name": name,
        "key": stored.key,
        "plain_size": stored.plain_size,
        "stored_size": stored.stored_size,
        "sha256": stored.sha256,
        "key_id": stored.key_id,
    }


def commit(repo: ObjectRepository, manifest_key: str, manifest: dict[str, Any]) -> BackupResult:
    """Write the manifest, the backup's commit point, unless another attempt already committed it.

    Only with every object it lists in the bucket at the size this attempt stored: a manifest never
    commits objects that were aborted or replaced under it.
    """
    for entry in manifest["objects"]:
        try:
            stored: int | None = repo.store.size(entry["key"])
        except ObjectNotFound:
            stored = None
        if stored != entry["stored_size"]:
            raise EngineError(
                f"backup {manifest['backup_id']}: object {entry['key']} holds {stored} bytes, not the "
                f"{entry['stored_size']} this attempt stored; not committing, a retry takes a new copy"
            )
    committed, created = repo.commit_json(manifest_key, manifest)
    _sweep_superseded(repo, manifest_key, committed)
    return BackupResult(committed, created=created)


def _sweep_superseded(repo: ObjectRepository, manifest_key: str, committed: dict[str, Any]) -> None:
    """Delete what other attempts at this backup left beside the committed one (finished parts of an
    attempt that lost its lease; this attempt's own, if another committed first).

    Only once a manifest is committed, and only keys it does not own: a committed manifest never
    changes, so nothing it needs can go. A straggler written later is an orphan `backups expire` removes.
    """
    owned = catalog.referenced_keys(committed) | {manifest_key}
    prefix = manifest_key.rsplit("/", 1)[0] + "/"
    leftovers = [key for key in repo.list_keys(prefix) if key not in owned]
    for key in leftovers:
        repo.delete(key)
    if leftovers:
        backup = committed["backup_id"]
        log.info("backup %s: deleted %d object(s) left by superseded attempts", backup, len(leftovers))


class _BaseBackupRun:
    """pg_basebackup writing its tars into a spool folder; `check()` raises if it failed."""

    def __init__(self, command: list[str], env: dict[str, str], folder: Path) -> None:
        self.start_lsn: str | None = None
        self.stop_lsn: str | None = None
        self.timeline: int | None = None
        self.tars = TarSpool(command, env, folder, self._read_line)

    def archives(self) -> Iterator[tuple[str, Iterator[bytes]]]:
        return self.tars.archives()

    def check(self) -> None:
        if self.tars.returncode != 0 or self.stop_lsn is None:
            code = self.tars.returncode
            raise EngineError(f"pg_basebackup failed (exit {code}): {self.tars.said()}")

    def _read_line(self, line: str) -> None:
        if m := START_RE.search(line):
            self.start_lsn, self.timeline = m.group(1), int(m.group(2))
        elif m := END_RE.search(line):
            self.stop_lsn = m.group(1)


def restore_full(
    repo: ObjectRepository,
    manifest: dict[str, Any],
    into: Path,
    *,
    spaces: list[Tablespace] | None = None,
    parallel: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    keeps: Callable[[str], bool] | None = None,
) -> list[Tablespace]:
    """Download, verify, decrypt and unpack a full backup into an empty folder PostgreSQL can start from.

    Each tablespace goes to its folder in `spaces` (default: beside `into`, see `tablespaces.layout`),
    which must be new or empty too; returns where each went. A full stored as parts is laid out
    `parallel` parts at once; with `keeps`, only the parts of the groups it keeps (see `subset`).
    """
    if spaces is None:
        spaces = tablespaces_layout([manifest], into)
    folders = [into, *(s.into for s in spaces)]
    for folder in folders:
        if folder.exists() and any(folder.iterdir()):
            raise EngineError(f"{folder} is not empty; restore into a new or empty folder")
    try:
        if manifest.get("layout") == parts.LAYOUT:
            _lay_out_parts(repo, manifest, into, spaces, folders, parallel, on_progress, keeps)
        else:  # one archive: `subset_for` never splits it
            _lay_out_tars(repo, manifest, into, spaces, on_progress)
    except BaseException:
        # Never leave a half-restored folder that someone might start.
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for folder in folders:
        hand_over(folder)
    return spaces


def _lay_out_tars(
    repo: ObjectRepository,
    manifest: dict[str, Any],
    into: Path,
    spaces: list[Tablespace],
    on_progress: Callable[[int, int], None] | None,
) -> None:
    """A full through pg_basebackup: base.tar into the data directory, each tablespace's tar into its
    folder."""
    by_oid = {int(t["oid"]): t["key"] for t in manifest.get("tablespaces", ())}
    objects = {o["key"]: o for o in manifest["objects"]}
    (base,) = (o for o in manifest["objects"] if o["name"] == "base.tar")
    tars = [(base, into)] + [(objects[by_oid[s.oid]], s.into) for s in spaces if s.oid in by_oid]
    total = sum(entry["plain_size"] for entry, _ in tars)
    done = 0
    for entry, folder in tars:
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        size = entry["plain_size"]
        plain = repo.get_stream(entry["key"], expect_sha256=entry["sha256"], expect_size=size)
        if on_progress is not None:
            plain = counted(plain, lambda n, before=done: on_progress(before + n, total))
        # PostgreSQL links a tablespace at pg_tblspc/<oid> in base.tar; no other link belongs anywhere.
        links = {f"pg_tblspc/{s.oid}" for s in spaces} if folder == into else set()
        archive = f"{manifest['backup_id']}/{entry['name']}"
        unpack_tar(plain, folder, TarGuard(archive, links.__contains__))
        done += size
    for space in spaces:
        space.into.mkdir(mode=0o700, parents=True, exist_ok=True)
    link_tablespaces(into, spaces)


def _lay_out_parts(
    repo: ObjectRepository,
    manifest: dict[str, Any],
    into: Path,
    spaces: list[Tablespace],
    folders: list[Path],
    parallel: int,
    on_progress: Callable[[int, int], None] | None,
    keeps: Callable[[str], bool] | None,
) -> None:
    """A full read from the data directory (see `filebackup`): its parts (those `keeps` keeps), then its
    backup label."""
    objects = parts.kept(manifest["objects"], keeps)
    total = sum(o["plain_size"] for o in objects)
    for folder in folders:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    # The tablespaces' links first: their files go through them. Then all of it is the server's
    # user's, who unpacks the parts.
    link_tablespaces(into, spaces)
    for folder in folders:
        hand_over(folder)
    parts.restore_all(
        repo,
        objects,
        into,
        manifest["backup_id"],
        parallel=parallel,
        on_progress=None if on_progress is None else (lambda done: on_progress(done, total)),
    )
    (into / "backup_label").write_text(manifest["backup_label"])
