"""account-expired and account-reactivated: each account's lifecycle state in the ledger.

An expiry sets the purge date (see `purge_dates`); a reactivation before the purge cancels it, and
nothing has been deleted. Events that cannot apply are refused with the reason and dead-lettered,
leaving nothing behind: an unknown tenant, an expiry in the future, anything for a purged account.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from messages.events import AccountExpired, AccountReactivated, Event
from workers.context import WorkerContext
from workers.errors import PermanentError
from workers.jobs import run_once
from workers.ledger.ledger import AccountStateConflict
from workers.tenants.purge_dates import purge_after
from workers.tenants.registry import TenantRegistry


def handle_account_expired(ctx: WorkerContext, event: AccountExpired) -> str | None:
    tenant = TenantRegistry(ctx.settings).get(event.tenant)
    now = ctx.ledger.now()
    if event.expired_at > now + timedelta(seconds=ctx.settings.lifecycle.clock_skew_seconds):
        raise PermanentError(
            f"expired_at: {_show(event.expired_at)} is in the future (now {_show(now)}); "
            "publish account-expired when the account has expired"
        )
    purge = purge_after(event.plan, event.expired_at, event.trial_started_at, ctx.settings.lifecycle)
    return _record(
        ctx,
        event,
        event.tenant,
        status="expired",
        plan=event.plan,
        expired_at=event.expired_at,
        trial_started_at=event.trial_started_at,
        purge=purge,
        # A second expiry of an expired account (e.g. a corrected date) replaces the first.
        allowed_from=("active", "expired"),
        location=(tenant.target, tenant.database),
        outcome=(
            f"recorded: tenant {event.tenant} ({event.plan}) expired at {_show(event.expired_at)}; "
            f"its data is kept until {_show(purge)}, then purged unless it is reactivated"
        ),
    )


def handle_account_reactivated(ctx: WorkerContext, event: AccountReactivated) -> str | None:
    TenantRegistry(ctx.settings).get(event.tenant)
    before = ctx.ledger.account(event.tenant)
    cancelled = (
        f"; the purge planned for {_show(before['purge_after'])} is cancelled and nothing was deleted"
        if before is not None and before["purge_after"] is not None
        else ""
    )
    return _record(
        ctx,
        event,
        event.tenant,
        status="active",
        plan=None,
        expired_at=None,
        trial_started_at=None,
        purge=None,
        allowed_from=("active", "expired"),
        outcome=f"recorded: tenant {event.tenant} reactivated{cancelled}",
    )


def _record(
    ctx: WorkerContext,
    event: Event,
    tenant: str,
    *,
    status: str,
    plan: str | None,
    expired_at: datetime | None,
    trial_started_at: datetime | None,
    purge: datetime | None,
    allowed_from: tuple[str, ...],
    outcome: str,
    location: tuple[str, str] | None = None,
) -> str | None:
    def record() -> str:
        try:
            ctx.ledger.record_account_event(
                tenant=tenant,
                event_type=event.type,
                event_id=event.event_id,
                occurred_at=event.occurred_at,
                plan=plan,
                status=status,
                expired_at=expired_at,
                trial_started_at=trial_started_at,
                purge_after=purge,
                allowed_from=allowed_from,
                detail=json.dumps(event.to_dict()),
                location=location,
            )
        except AccountStateConflict as e:
            raise PermanentError(_refusal(event, e)) from None
        return outcome

    return run_once(ctx, event, record)


def _refusal(event: Event, conflict: AccountStateConflict) -> str:
    if conflict.status == "purged":
        when = f" at {_show(conflict.purged_at)}" if conflict.purged_at else ""
        return (
            f"tenant: {conflict.tenant} was purged{when}; its data is gone, so {event.type} cannot "
            "apply (a returning customer starts a new account)"
        )
    return f"tenant: {conflict.tenant} is being purged ({conflict.status}); {event.type} cannot apply now"


def _show(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H:%M:%SZ}"
