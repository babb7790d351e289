"""What a target's repository holds: backup chains, the WAL archive, and the restorable window."""

from __future__ import annotations

import itertools
from typing import Any

from workers.engines.postgresql.restore import Unreachable, plan_restore
from workers.engines.postgresql.walarchive import list_wal
from workers.engines.postgresql.walnames import DEFAULT_SEGMENT_SIZE, Segment
from workers.repository import catalog
from workers.repository.objects import ObjectRepository


def inventory(repo: ObjectRepository, target: str) -> dict[str, Any]:
    manifests = catalog.list_manifests(repo, target)
    fulls = [m for m in manifests if m["kind"] == "full"]
    segment_size = (fulls[-1].get("wal_segment_size") if fulls else None) or DEFAULT_SEGMENT_SIZE
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
        window = plan_restore(repo, target, None).window
        restorable = {
            "earliest": catalog.iso(window.earliest),
            "latest": catalog.iso(window.latest),
            "intervals": [[catalog.iso(a), catalog.iso(b)] for a, b in window.intervals],
        }
    except Unreachable:
        restorable = None
    return {
        "target": target,
        "restorable_window": restorable,
        "chains": chains,
        "backups": manifests,
        "wal": _wal_summary(repo, target, segment_size),
    }


def _wal_summary(repo: ObjectRepository, target: str, segment_size: int) -> dict[str, Any]:
    entries = list_wal(repo, target, segment_size)
    segments = sorted(e.segment for e in entries if e.segment is not None and not e.partial)
    partial = next((e for e in entries if e.partial), None)
    gaps = [
        Segment(a.timeline, n).name(segment_size)
        for a, b in itertools.pairwise(segments)
        if a.timeline == b.timeline
        for n in range(a.segno + 1, b.segno)
    ]
    newest = max((e.uploaded_at for e in entries), default=None)
    return {
        "segments": len(segments),
        "first": segments[0].name(segment_size) if segments else None,
        "last": segments[-1].name(segment_size) if segments else None,
        "partial": partial.filename if partial else None,
        "newest_upload": catalog.iso(newest) if newest else None,
        "gaps": gaps,
    }
