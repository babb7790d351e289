"""Where a tenant's exports live and what their manifests say.

An export is two objects under the tenant's prefix, both encrypted with the tenant's key:
`tenants/<id>/exports/<export id>.dump.dv` (the pg_dump custom-format file) and, written last as the
commit point, `tenants/<id>/exports/<export id>.json.dv` (its manifest). An export whose manifest is
missing was never finished and is not listed.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from workers.repository.errors import IntegrityError
from workers.repository.objects import ObjectRepository
from workers.tenants.keys import tenant_prefix

MANIFEST_SUFFIX = ".json.dv"
DUMP_SUFFIX = ".dump.dv"


def exports_prefix(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}exports/"


def export_id(requested_at: datetime, idempotency_key: str) -> str:
    """A sortable id that the same request always maps to: its time, then a hash of its key."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:12]
    return f"{requested_at:%Y%m%dT%H%M%SZ}-{digest}"


def dump_key(tenant: str, export: str) -> str:
    return f"{exports_prefix(tenant)}{export}{DUMP_SUFFIX}"


def manifest_key(tenant: str, export: str) -> str:
    return f"{exports_prefix(tenant)}{export}{MANIFEST_SUFFIX}"


def list_exports(repo: ObjectRepository, tenant: str) -> list[dict[str, Any]]:
    """The tenant's finished exports, oldest first (`repo` must carry the tenant's key)."""
    found = []
    for key in repo.list_keys(exports_prefix(tenant)):
        if key.endswith(MANIFEST_SUFFIX):
            manifest = repo.get_json(key)
            if not isinstance(manifest, dict) or manifest.get("tenant") != tenant:
                raise IntegrityError("it is not an export manifest of this tenant", key)
            found.append(manifest)
    return sorted(found, key=lambda m: m["export_id"])


def find_export(repo: ObjectRepository, tenant: str, export: str) -> dict[str, Any] | None:
    key = manifest_key(tenant, export)
    if not repo.exists(key):
        return None
    manifest = repo.get_json(key)
    if not isinstance(manifest, dict) or manifest.get("export_id") != export:
        raise IntegrityError("it is not the manifest of this export", key)
    return manifest


def prune(repo: ObjectRepository, tenant: str, *, keep_scheduled: int, now: datetime) -> list[str]:
    """Delete expired exports and scheduled ones beyond the newest `keep_scheduled`; their ids."""
    found = list_exports(repo, tenant)
    scheduled = [m for m in found if m["kind"] == "scheduled"]
    surplus = scheduled[: max(len(scheduled) - keep_scheduled, 0)]
    expired = [m for m in found if expired_at(m, now)]
    gone = {m["export_id"]: m for m in [*surplus, *expired]}
    for export, manifest in sorted(gone.items()):
        # The manifest first: the export stops being listed before its dump disappears.
        repo.delete(manifest_key(tenant, export))
        repo.delete(manifest["dump_key"])
    return sorted(gone)


def expired_at(manifest: dict[str, Any], now: datetime) -> bool:
    """Whether an export can no longer be downloaded at `now` (scheduled ones never expire by time)."""
    return manifest["expires_at"] is not None and datetime.fromisoformat(manifest["expires_at"]) <= now
