"""What a target's repository holds: backup chains, the log archive, and the restorable window."""

from __future__ import annotations

from typing import Any

from deskvault_core.config import TargetSettings
from workers.engines.base import LogArchive, Unreachable
from workers.engines.registry import engine_for
from workers.repository import catalog
from workers.repository.objects import ObjectRepository


def inventory(repo: ObjectRepository, target: TargetSettings) -> dict[str, Any]:
    engine = engine_for(target)
    manifests = catalog.list_manifests(repo, target.name)
    fulls = [m for m in manifests if m["kind"] == "full"]
    chains = [
        {
            "full": f["backup_id"],
            "diffs": [
                m["backup_id"] for m in manifests if m["kind"] == "diff" and m.get("parent") == f["backup_id"]
            ],
        }
        for f in fulls
    ]
    try:
        window = engine.plan_restore(repo, None).window
        restorable = {
            "earliest": catalog.iso(window.earliest),
            "latest": catalog.iso(window.latest),
            "intervals": [[catalog.iso(a), catalog.iso(b)] for a, b in window.intervals],
        }
    except Unreachable:
        restorable = None
    reaches = engine.restorable_by_backup(repo)
    return {
        "target": target.name,
        "restorable_window": restorable,
        "chains": chains,
        "backups": [{**m, "restorable": reaches.get(m["backup_id"])} for m in manifests],
        "wal": _log_summary(engine.log_archive(repo, manifests)),
    }


def _log_summary(archive: LogArchive) -> dict[str, Any]:
    files = sorted(
        (f for f in archive.files if f.position is not None and not f.partial),
        key=lambda f: (f.timeline, f.position or 0),
    )
    partial = next((f for f in archive.files if f.partial), None)
    newest = max((f.uploaded_at for f in archive.files), default=None)
    return {
        "segments": len(files),
        "first": files[0].name if files else None,
        "last": files[-1].name if files else None,
        "partial": partial.name if partial else None,
        "newest_upload": catalog.iso(newest) if newest else None,
        "gaps": archive.gaps(),
    }
