"""Events deskvault tells the SaaS about, on a topic exchange, so it can email the customer.

  export-ready     an export can be downloaded (on request or scheduled)
  purge-upcoming   a tenant's data will be purged in `lifecycle.purge_notice_days` (7) days
  tenant-restored  a tenant's database was restored to a moment on its live target

Each is JSON, routed by its type. `event_id` is derived from the fact it reports, so a consumer that
sees the same id twice (deskvault publishes at least once) drops the second. Schemas:
messages/schemas/outbound/.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

OUTBOUND_EXCHANGE = "deskvault.outbound"
VERSION = 1
# uuid5 namespace for outbound event ids.
_NAMESPACE = uuid.UUID("6f1d3a52-9c0e-4d7b-8a21-3e5b7c9d0f14")


def _iso(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H:%M:%SZ}"


def _base(kind: str, fact: str, now: datetime) -> dict[str, Any]:
    return {
        "type": kind,
        "version": VERSION,
        "event_id": str(uuid.uuid5(_NAMESPACE, f"{kind}:{fact}")),
        "occurred_at": _iso(now),
    }


def export_ready(manifest: dict[str, Any], now: datetime) -> dict[str, Any]:
    """export-ready for an export's manifest; the download link itself comes from the endpoint."""
    return {
        **_base("export-ready", f"{manifest['tenant']}:{manifest['export_id']}", now),
        "tenant": manifest["tenant"],
        "export_id": manifest["export_id"],
        "kind": manifest["kind"],
        "request_id": manifest["request_id"],
        "as_of": _iso(datetime.fromisoformat(manifest["as_of"])) if manifest["as_of"] else None,
        "size_bytes": manifest["plain_size"],
        "expires_at": _iso(datetime.fromisoformat(manifest["expires_at"]))
        if manifest["expires_at"]
        else None,
    }


def purge_upcoming(tenant: str, purge_after: datetime, now: datetime) -> dict[str, Any]:
    return {
        **_base("purge-upcoming", f"{tenant}:{_iso(purge_after)}", now),
        "tenant": tenant,
        "purge_after": _iso(purge_after),
    }


def tenant_restored(restored: dict[str, Any], now: datetime) -> dict[str, Any]:
    """tenant-restored for a finished tenant restore (`TenantRestored.as_json()`): where the data as of
    the moment now is, and exactly which commit replay stopped after."""
    return {
        **_base("tenant-restored", f"{restored['tenant']}:{restored['request_id']}", now),
        **{
            name: restored[name]
            for name in (
                "tenant",
                "request_id",
                "requested_by",
                "mode",
                "database",
                "restored_as",
                "put_aside_as",
                "asked_at",
                "reached_at",
                "reached_xid",
                "stop",
            )
        },
    }
