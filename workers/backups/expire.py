"""Apply the retention policy to a target's repository: list it, plan with `retention`, delete.

A backup's manifest is deleted before its data, so a crash midway leaves unreferenced data (cleaned up
by the next run, once it is a day old) and never a manifest pointing at missing objects. Multipart
uploads abandoned for more than a day (a worker killed mid-upload) are aborted too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from deskvault_core.config import TargetSettings
from workers.backups.retention import Backup, Plan, Policy, WalObject, describe, plan
from workers.engines.base import LogArchive
from workers.engines.registry import engine_for
from workers.repository import catalog
from workers.repository.objects import ObjectRepository

log = logging.getLogger(__name__)

STALE = timedelta(days=1)


@dataclass(frozen=True)
class ExpireResult:
    plan: Plan
    lines: list[str]
    deleted: int
    aborted_uploads: int
    orphans: int
    # Backups and log manifests whose manifests were deleted (none in a dry run): the ledger forgets them.
    forgotten: tuple[str, ...] = ()


def policy_for(target: TargetSettings) -> Policy:
    return Policy(
        full_count=target.retention_full_count,
        full_max_age=timedelta(days=target.retention_full_max_age_days),
    )


def expire(repo: ObjectRepository, target: TargetSettings, now: datetime, *, dry_run: bool) -> ExpireResult:
    manifests = catalog.every_manifest(repo, target.name)
    archive = engine_for(target).log_archive(repo, manifests)
    keys_by_backup: dict[str, list[str]] = {}
    for key in repo.list_keys(f"targets/{target.name}/backups/"):
        keys_by_backup.setdefault(key.split("/")[3], []).append(key)
    backups = [
        _backup(m, keys_by_backup.get(m["backup_id"], []), archive)
        for m in manifests
        if m["kind"] in ("full", "diff")
    ]
    wal = [WalObject(f.key, f.timeline, f.position, f.partial) for f in archive.files]
    decided = plan(backups, wal, policy_for(target), now)
    # Log manifests describe WAL of a chain; they go with the chain's full.
    expired = set(decided.expired_backups)
    logs = [m for m in manifests if m["kind"] == "log" and m.get("parent") in expired]
    doomed = [catalog.manifest_key(target.name, b) for b in sorted(expired)]
    doomed += [catalog.manifest_key(target.name, m["backup_id"]) for m in logs]
    doomed += [k for k in decided.expired_keys if k not in doomed]
    doomed += [c for k in decided.expired_keys for c in archive.companions(k)]
    lines = describe(decided) + [
        f"would delete log manifest {m['backup_id']}: its full expired" for m in logs
    ]
    orphans = _orphans(repo, target.name, manifests, now)
    stale_uploads = _stale_uploads(repo, target.name, now)
    if dry_run:
        lines += [f"would delete unreferenced object {k}" for k in orphans]
        lines += [
            f"would abort multipart upload of {k} (started {started:%Y-%m-%d %H:%M})"
            for k, _, started in stale_uploads
        ]
        return ExpireResult(decided, lines, 0, 0, 0)
    for key in doomed + orphans:
        repo.delete(key)
    for key, upload_id, _ in stale_uploads:
        repo.store.abort_upload(key, upload_id)
    if doomed or orphans or stale_uploads:
        log.info(
            "expire %s: deleted %d objects (%d unreferenced), aborted %d stale uploads",
            target.name,
            len(doomed) + len(orphans),
            len(orphans),
            len(stale_uploads),
        )
    return ExpireResult(
        decided,
        [line.replace("would delete", "deleted") for line in lines],
        len(doomed) + len(orphans),
        len(stale_uploads),
        len(orphans),
        tuple(sorted(expired) + [m["backup_id"] for m in logs]),
    )


def _backup(manifest: dict, keys: list[str], archive: LogArchive) -> Backup:
    timeline, start, stop = archive.span(manifest)
    return Backup(
        backup_id=manifest["backup_id"],
        kind=manifest["kind"],
        parent=manifest["parent"] if manifest["kind"] == "diff" else None,
        timeline=timeline,
        start_segno=start,
        stop_segno=stop,
        finished_at=datetime.fromisoformat(manifest["finished_at"]),
        keys=tuple(sorted(keys)),
    )


def _orphans(repo: ObjectRepository, target: str, manifests: list[dict], now: datetime) -> list[str]:
    """Leftovers, once a day old: every object under the target's backups that no manifest owns -- data of
    backups that never committed (or whose manifest was deleted) and a superseded attempt's objects.

    The caller has refused to run with any manifest unreadable, so `manifests` covers every manifest the
    bucket lists: an object is never judged unowned because this worker's keys could not read its owner.
    """
    owned = {k for m in manifests for k in catalog.referenced_keys(m)}
    return [
        entry.key
        for entry in repo.store.list_entries(f"targets/{target}/backups/")
        if now - entry.uploaded_at > STALE
        and entry.key not in owned
        and not entry.key.endswith("/" + catalog.MANIFEST_NAME)
    ]


def _stale_uploads(repo: ObjectRepository, target: str, now: datetime) -> list[tuple[str, str, datetime]]:
    return [u for u in repo.store.multipart_uploads(f"targets/{target}/") if now - u[2] > STALE]
