"""export-requested: a tenant's complete helpdesk database as a downloadable, encrypted logical dump.

The dump (pg_dump's custom format, for PostgreSQL) streams from the target's engine through zstd and
AES-256-GCM under the tenant's own key into the repository; its manifest, written last, makes it
visible. With `as_of`, the target is first restored to that moment in a scratch server (the
point-in-time restore), and the dump comes from there. Bad requests are refused before anything is
written: an unknown or purged tenant, an `as_of` outside the restorable window.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from messages import outbound
from messages.events import ExportRequested
from producers.publisher import Publisher
from workers.context import WorkerContext
from workers.engines.base import Engine, RestorePlan, ScratchServer, Unreachable
from workers.engines.registry import engine_for
from workers.errors import PermanentError
from workers.jobs import run_once
from workers.repository import catalog
from workers.tenants import exports
from workers.tenants.keys import tenant_repository
from workers.tenants.registry import Tenant, TenantRegistry

log = logging.getLogger(__name__)


def handle_export_requested(ctx: WorkerContext, event: ExportRequested) -> str | None:
    tenant = TenantRegistry(ctx.settings).get(event.tenant)
    account = ctx.ledger.account(tenant.id)
    if account is not None and account["status"] in ("purging", "purged"):
        raise PermanentError(f"tenant: {tenant.id} was purged; there is no data left to export")
    plan = None
    if event.as_of is not None:
        try:
            plan = engine_for(ctx.settings.target(tenant.target)).plan_restore(ctx.repository, event.as_of)
        except Unreachable as e:
            raise PermanentError(f"as_of: {e}") from None
    return run_once(ctx, event, lambda: _export(ctx, event, tenant, plan))


def _export(ctx: WorkerContext, event: ExportRequested, tenant: Tenant, plan: RestorePlan | None) -> str:
    repo = tenant_repository(ctx, tenant.id, create=True)
    export = exports.export_id(event.occurred_at, event.idempotency_key)
    existing = exports.find_export(repo, tenant.id, export)
    if existing is not None:  # an earlier attempt finished it and died before the ledger heard
        return _ready(ctx, existing)
    engine = engine_for(ctx.settings.target(tenant.target))
    started = ctx.ledger.now()
    with _dump_source(ctx, engine, plan) as server:
        stored = repo.put_stream(
            exports.dump_key(tenant.id, export), engine.dump_database(tenant.database, server)
        )
    finished = ctx.ledger.now()
    kind = event.kind or "on-request"
    downloads = ctx.settings.downloads
    # A scheduled export has no expiry: it stays until newer ones push it out of the newest N.
    expires = None if kind == "scheduled" else finished + timedelta(days=downloads.export_ttl_days)
    manifest = {
        "format": 1,
        "tenant": tenant.id,
        "export_id": export,
        "kind": kind,
        "request_id": event.request_id,
        "requested_by": event.requested_by,
        "event_id": event.event_id,
        "database": tenant.database,
        "as_of": catalog.iso(event.as_of) if event.as_of else None,
        "started_at": catalog.iso(started),
        "created_at": catalog.iso(finished),
        "expires_at": catalog.iso(expires) if expires else None,
        "dump_key": stored.key,
        "plain_size": stored.plain_size,
        "stored_size": stored.stored_size,
        "sha256": stored.sha256,
        "format_name": engine.dump_format,
    }
    manifest, _ = repo.commit_json(exports.manifest_key(tenant.id, export), manifest)
    pruned = exports.prune(repo, tenant.id, keep_scheduled=downloads.scheduled_keep, now=finished)
    if pruned:
        log.info("tenant %s: removed %d old export(s): %s", tenant.id, len(pruned), ", ".join(pruned))
    return _ready(ctx, manifest)


def _ready(ctx: WorkerContext, manifest: dict[str, Any]) -> str:
    """Tell the SaaS (export-ready), also after a redelivery: the event id makes repeats droppable."""
    settings = ctx.settings
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        heard = publisher.publish_outbound(outbound.export_ready(manifest, ctx.ledger.now()))
    return _outcome(manifest) + ("" if heard else " (export-ready reached no queue)")


@contextmanager
def _dump_source(
    ctx: WorkerContext, engine: Engine, plan: RestorePlan | None
) -> Iterator[ScratchServer | None]:
    """Where to dump from: the live target (None), or a scratch copy restored to `as_of` (torn down after)."""
    if plan is None:
        yield None
        return
    with engine.scratch_server("export") as server:
        log.info("export: restoring %s to %s for the dump", engine.target.name, plan.at)
        engine.restore(ctx.repository, plan, server.datadir, start=True, port=server.port, throwaway=True)
        yield server


def _outcome(manifest: dict[str, Any]) -> str:
    as_of = f" as of {_show(manifest['as_of'])}" if manifest["as_of"] else ""
    return (
        f"export {manifest['export_id']} of tenant {manifest['tenant']}{as_of} ready: "
        f"{manifest['plain_size'] / 2**20:.1f} MiB, downloadable "
        + (
            f"until {_show(manifest['expires_at'])}"
            if manifest["expires_at"]
            else "while among the newest kept"
        )
    )


def _show(iso: str) -> str:
    return f"{datetime.fromisoformat(iso):%Y-%m-%dT%H:%M:%SZ}"
