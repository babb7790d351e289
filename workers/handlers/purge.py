"""purge-due: delete an expired tenant's data for good, once its retention window has passed.

Steps, each safe to repeat, so a purge killed midway completes on redelivery:
  0. refused, changing nothing, if the database is the server's or deskvault's, or another tenant's too;
  1. the ledger marks the account `purging` (refused, with the reason, if it was reactivated, is under
     a legal hold, or is not due);
  2. the tenant's database is dropped on its target;
  3. every unfinished multipart upload under the tenant's prefix, and at its key store object, is
     aborted: their parts are stored data that no object listing shows;
  4. every object under the tenant's prefix (exports, downloadable backups) is deleted, every version;
  5. the tenant's data key is destroyed, so any copy of its objects left anywhere is unreadable: every
     version of its key store object is deleted and none may remain (a store that refuses, such as one
     under object lock, fails the purge here, naming why), and a legacy row in the control database goes
     too. The key lives outside the control database so that restoring a backup of it taken before the
     purge cannot bring the key back (workers/tenants/keys.py). A redelivery finds it already gone;
  6. only then the account becomes `purged`, with an audit record of what was removed, when, and on
     which event.
The tenant's rows in the target's physical backups age out with those backups (see docs/design.md).
"""

from __future__ import annotations

import json
import logging

from deskvault_core.config import reserved_database
from messages.events import PurgeDue
from workers.context import WorkerContext
from workers.engines.registry import engine_for
from workers.errors import PermanentError
from workers.jobs import run_once
from workers.ledger.ledger import PurgeRefused
from workers.tenants.keys import abort_tenant_uploads, destroy_tenant_key, tenant_prefix
from workers.tenants.registry import TenantRegistry

log = logging.getLogger(__name__)


def handle_purge_due(ctx: WorkerContext, event: PurgeDue) -> str | None:
    def purge() -> str:
        target, database = _location(ctx, event.tenant)
        if (ctx.ledger.account(event.tenant) or {}).get("status") != "purged":
            _refuse_shared(ctx, event.tenant, target, database)  # before the account is marked
        try:
            state = ctx.ledger.begin_purge(event.tenant, event.purge_after)
        except PurgeRefused as e:
            raise PermanentError(str(e)) from None
        if state == "purged":
            return f"already purged: tenant {event.tenant}"
        started_at = ctx.ledger.now()
        log.info("purge of tenant %s %s: dropping database %s/%s", event.tenant, state, target, database)
        dropped = engine_for(ctx.settings.target(target)).drop_database(database)
        aborted = abort_tenant_uploads(ctx, event.tenant)
        removed = ctx.repository.store.delete_everything(tenant_prefix(event.tenant))
        key_destroyed = destroy_tenant_key(ctx, event.tenant)  # raises, and nothing is marked, if it stays
        detail = {
            "database": f"{target}/{database}",
            "database_dropped": dropped,  # False: it was already gone (an earlier attempt dropped it)
            "uploads_aborted": aborted,
            "objects_deleted": removed,
            "tenant_key_destroyed": key_destroyed,
            "resumed": state == "resumed",
        }
        ctx.ledger.finish_purge(
            event.tenant,
            event_id=event.event_id,
            idempotency_key=event.idempotency_key,
            purge_after=event.purge_after,
            started_at=started_at,
            detail=json.dumps(detail),
        )
        return (
            f"purged tenant {event.tenant}: database {target}/{database} "
            f"{'dropped' if dropped else 'already gone'}, {removed} object version(s) deleted, "
            f"data key {'destroyed' if key_destroyed else 'already destroyed'}, "
            f"{aborted} unfinished upload(s) aborted"
        )

    return run_once(ctx, event, purge)


def _refuse_shared(ctx: WorkerContext, tenant: str, target: str, database: str) -> None:
    """Never drop a database the server or deskvault owns, or one another tenant still uses."""
    if (why := reserved_database(database, ctx.settings.control_db)) is not None:
        raise PermanentError(f"purge of tenant {tenant} refused: database {why}; nothing was dropped")
    statuses = ctx.ledger.account_statuses()
    users = [
        other
        for other in TenantRegistry(ctx.settings).sharing(target, database, but=tenant)
        if statuses.get(other) != "purged"
    ]
    if users:
        raise PermanentError(
            f"purge of tenant {tenant} refused: database {target}/{database} is also used by tenant "
            f"{', '.join(users)}; nothing was dropped. Give each tenant its own database, then publish "
            "the purge again"
        )


def _location(ctx: WorkerContext, tenant: str) -> tuple[str, str]:
    """Target and database recorded when the account expired; the tenant list if none was recorded."""
    account = ctx.ledger.account(tenant) or {}
    if account.get("target") and account.get("database"):
        return account["target"], account["database"]
    known = TenantRegistry(ctx.settings).get(tenant)
    return known.target, known.database
