"""account-expired and account-reactivated: record the account's state in the ledger.

Purging expired accounts comes later; for now the lifecycle pool keeps an exact record of what happened
to each account, which is what the purge will be computed from.
"""

from __future__ import annotations

import json

from messages.events import AccountExpired, AccountReactivated
from workers.context import WorkerContext
from workers.jobs import run_once


def handle_account_expired(ctx: WorkerContext, event: AccountExpired) -> str | None:
    def record() -> str:
        ctx.ledger.record_account_event(
            tenant=event.tenant,
            event_type=event.type,
            event_id=event.event_id,
            occurred_at=event.occurred_at,
            plan=event.plan,
            status="expired",
            expired_at=event.expired_at,
            trial_started_at=event.trial_started_at,
            detail=json.dumps(event.to_dict()),
        )
        return (
            f"recorded: tenant {event.tenant} ({event.plan}) expired at {event.expired_at:%Y-%m-%dT%H:%M:%SZ}"
        )

    return run_once(ctx, event, record)


def handle_account_reactivated(ctx: WorkerContext, event: AccountReactivated) -> str | None:
    def record() -> str:
        ctx.ledger.record_account_event(
            tenant=event.tenant,
            event_type=event.type,
            event_id=event.event_id,
            occurred_at=event.occurred_at,
            plan=None,
            status="active",
            expired_at=None,
            trial_started_at=None,
            detail=json.dumps(event.to_dict()),
        )
        return f"recorded: tenant {event.tenant} reactivated"

    return run_once(ctx, event, record)
