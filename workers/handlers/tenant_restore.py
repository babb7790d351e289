"""tenant-restore-requested: a tenant's database restored to a moment on its live target, beside the
current one or in its place (workers.tenants.restore does it).

The request is checked before `run_once` claims a job, so a refused one is dead-lettered with its reason
and leaves no job behind; the restore runs once per request and ends with the outbound `tenant-restored`.
"""

from __future__ import annotations

from messages import outbound
from messages.events import TenantRestoreRequested
from producers.publisher import Publisher
from workers.context import WorkerContext
from workers.jobs import run_once
from workers.tenants.restore import SIDE_BY_SIDE, Prepared, TenantRestoreRequest, prepare, restore_tenant


def handle_tenant_restore_requested(ctx: WorkerContext, event: TenantRestoreRequested) -> str | None:
    request = TenantRestoreRequest(
        tenant=event.tenant,
        at=event.at,
        mode=event.mode or SIDE_BY_SIDE,
        as_name=event.as_name,
        force=bool(event.force),
        request_id=event.request_id,
        requested_by=event.requested_by,
        # The database put aside is named after the request, so a redelivery finds the same name
        requested_at=event.occurred_at,
    )
    # Refused (and so dead-lettered) before a job is claimed: nothing was tried
    prepared = prepare(ctx, request)
    return run_once(ctx, event, lambda: _restore_and_tell(ctx, request, prepared))


def _restore_and_tell(ctx: WorkerContext, request: TenantRestoreRequest, prepared: Prepared) -> str:
    result = restore_tenant(ctx, request, prepared=prepared)
    settings = ctx.settings
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        heard = publisher.publish_outbound(outbound.tenant_restored(result.as_json(), ctx.ledger.now()))
    return result.summary() + ("" if heard else " (tenant-restored reached no queue)")
