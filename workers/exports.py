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
from workers.tenantkeys import tenant_prefix

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
