"""When an expired account's data is purged: the policy's windows, in calendar months.

Paid accounts are kept `paid_retention_months` (4) after they expired; trials `trial_retention_months`
(5: the month of trial plus four) after the trial began. A month later than the day exists ends on the
month's last day (31 January + 1 month = 28 or 29 February), so no window is ever shorter than promised
by more than those missing days, and none runs into the month after.
"""

from __future__ import annotations

import calendar
from datetime import datetime

from deskvault_core.config import LifecycleSettings


def add_months(moment: datetime, months: int) -> datetime:
    """`moment` moved `months` calendar months on, the day clamped to the target month's length."""
    index = moment.year * 12 + (moment.month - 1) + months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def purge_after(
    plan: str, expired_at: datetime, trial_started_at: datetime | None, settings: LifecycleSettings
) -> datetime:
    """The moment after which an account that expired on `plan` ("trial" or "paid") is purged."""
    if plan == "trial":
        if trial_started_at is None:
            raise ValueError("a trial's purge date needs trial_started_at")
        # Never before the paid window would end either: a trial that ran long keeps its four months.
        return max(
            add_months(trial_started_at, settings.trial_retention_months),
            add_months(expired_at, settings.paid_retention_months),
        )
    return add_months(expired_at, settings.paid_retention_months)
