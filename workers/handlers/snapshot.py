"""snapshot-due: a server's daily snapshot, by its driver.

`ebs`: every volume of the instance as one set, copied to the DR region (see `ebs`), then retention in
each region. `files`: the configured directory trees into the repository (see `filetrees`), then
retention (the newest per day and per week) and the removal of chunks no kept snapshot uses. A server
with no driver is refused with the reason.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from deskvault_core.config import ServerSettings
from messages.events import SnapshotDue
from workers.context import WorkerContext
from workers.errors import PermanentError, UnknownTarget
from workers.jobs import run_once
from workers.repository.objects import ObjectRepository
from workers.servers import filetrees
from workers.servers.ebs import EbsDriver, check_settings
from workers.servers.retention import keep

log = logging.getLogger(__name__)

# A chunk no snapshot lists is deleted only once it is this old: a snapshot still being taken may be
# about to list it.
CHUNK_GRACE = timedelta(hours=24)


def handle_snapshot_due(ctx: WorkerContext, event: SnapshotDue) -> str | None:
    server = ctx.settings.servers.get(event.server)
    if server is None:
        known = ", ".join(sorted(ctx.settings.servers)) or "none"
        raise UnknownTarget(f"server: {event.server!r} is not configured (configured servers: {known})")
    if not server.driver:
        raise PermanentError(
            f'servers.{server.name}.driver: not set; choose "files" (directory trees) or "ebs"'
        )
    if server.driver == "ebs":
        check_settings(server)  # refused before anything is made
        return run_once(ctx, event, lambda: _ebs(ctx, event, server))
    return run_once(ctx, event, lambda: _files(ctx, event, server))


def _ebs(ctx: WorkerContext, event: SnapshotDue, server: ServerSettings) -> str:
    driver = EbsDriver(server)
    record, created = driver.take_set(ctx.repository, slot=event.slot, event_key=event.idempotency_key)
    deleted = driver.prune()
    copies = f", copied to {record['dr_region']}" if record["dr_region"] else ""
    pruned = ", ".join(f"{n} in {region}" for region, n in deleted.items())
    return (
        f"{'snapshot set' if created else 'snapshot set (already taken)'} {record['set_id']}: "
        f"{len(record['snapshots'])} volume(s) of {record['instance_id']}{copies}; retention deleted {pruned}"
    )


def _files(ctx: WorkerContext, event: SnapshotDue, server: ServerSettings) -> str:
    snapshot_id = f"{event.slot:%Y%m%dT%H%M%SZ}"
    manifest, created = filetrees.take_snapshot(
        ctx.repository,
        server.name,
        server.paths,
        snapshot_id=snapshot_id,
        extra={
            "event_id": event.event_id,
            "job_key": event.idempotency_key,
            "slot": f"{event.slot:%Y-%m-%dT%H:%M:%SZ}",
        },
    )
    expired, chunks = expire_snapshots(ctx.repository, server)
    return (
        f"{'snapshot' if created else 'snapshot (already taken)'} {snapshot_id} of {server.name}: "
        f"{manifest['files']} files, {manifest['bytes'] / 2**20:.1f} MiB; "
        f"{manifest['new_chunks']} new chunks "
        f"({manifest['new_bytes'] / 2**20:.1f} MiB, {manifest['stored_new_bytes'] / 2**20:.1f} MiB stored); "
        f"{manifest['reused_files']} files unchanged; expired {expired} snapshot(s) and {chunks} chunk(s)"
    )


def expire_snapshots(
    repo: ObjectRepository, server: ServerSettings, now: datetime | None = None
) -> tuple[int, int]:
    """Apply the server's retention, then delete chunks no kept snapshot lists; (snapshots, chunks) gone."""
    now = now or datetime.now(UTC)
    snapshots = filetrees.list_snapshots(repo, server.name)
    kept_ids = keep(
        # By schedule slot (a daily snapshot belongs to its day even if it ran late), else when taken.
        [(m["snapshot_id"], datetime.fromisoformat(m.get("slot") or m["finished_at"])) for m in snapshots],
        daily=server.keep_daily,
        weekly=server.keep_weekly,
    )
    kept = [m for m in snapshots if m["snapshot_id"] in kept_ids]
    for manifest in snapshots:
        if manifest["snapshot_id"] not in kept_ids:
            repo.delete(filetrees.manifest_key(server.name, manifest["snapshot_id"]))
    used = {c for m in kept for e in m["entries"] for c in e.get("chunks", ())}
    removed = 0
    for listed in repo.store.list_entries(f"servers/{server.name}/chunks/"):
        chunk_id = filetrees.chunk_id_of(listed.key)
        if chunk_id not in used and listed.uploaded_at < now - CHUNK_GRACE:
            repo.delete(listed.key)
            removed += 1
    return len(snapshots) - len(kept), removed
