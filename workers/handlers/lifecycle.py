"""account-expired and account-reactivated: record the account's state in the ledger.

Purging expired accounts comes later; for now the lifecycle pool keeps an exact record of what happened
to each account, which is what the purge will be computed from.
"""

from __future__ import annotations

import json
from datetime import datetime

from messages.events import AccountExpired, AccountReactivated, Event
from workers.context import WorkerContext
from workers.jobs import run_once


def handle_account_expired(ctx: WorkerContext, event: AccountExpired) -> str | None:
    when = f"{event.expired_at:%Y-%m-%dT%H:%M:%SZ}"
    return _record(
        ctx,
        event,
        event.tenant,
        status="expired",
        plan=event.plan,
        expired_at=event.expired_at,
        trial_started_at=event.trial_started_at,
        outcome=f"recorded: tenant {event.tenant} ({event.plan}) expired at {when}",
    )


def handle_account_reactivated(ctx: WorkerContext, event: AccountReactivated) -> str | None:
    return _record(
        ctx,
        event,
        event.tenant,
        status="active",
        plan=None,
        expired_at=None,
        trial_started_at=None,
        outcome=f"recorded: tenant {event.tenant} reactivated",
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
    outcome: str,
) -> str | None:
    def record() -> str:
        ctx.ledger.record_account_event(
            tenant=tenant,
            event_type=event.type,
            event_id=event.event_id,
            occurred_at=event.occurred_at,
            plan=plan,
            status=status,
            expired_at=expired_at,
            trial_started_at=trial_started_at,
            detail=json.dumps(event.to_dict()),
        )
        return outcome

    return run_once(ctx, event, record)
