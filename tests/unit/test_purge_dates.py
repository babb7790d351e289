"""The policy's windows: paid accounts 4 months after expiry, trials 5 months after the trial began."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deskvault_core.config import LifecycleSettings
from workers.tenants.purge_dates import add_months, purge_after

POLICY = LifecycleSettings()


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def test_a_paid_account_is_kept_four_months_after_it_expired() -> None:
    assert purge_after("paid", at(2026, 3, 15, 9, 30), None, POLICY) == at(2026, 7, 15, 9, 30)


def test_a_trial_is_kept_five_months_after_it_began() -> None:
    started, expired = at(2026, 1, 10), at(2026, 2, 10)
    assert purge_after("trial", expired, started, POLICY) == at(2026, 6, 10)


def test_a_trial_that_ran_long_still_gets_four_months_after_expiry() -> None:
    started, expired = at(2026, 1, 10), at(2026, 4, 1)
    assert purge_after("trial", expired, started, POLICY) == at(2026, 8, 1)


def test_the_windows_are_configurable() -> None:
    policy = LifecycleSettings(paid_retention_months=6, trial_retention_months=2)
    assert purge_after("paid", at(2026, 1, 1), None, policy) == at(2026, 7, 1)
    assert purge_after("trial", at(2026, 1, 20), at(2026, 1, 1), policy) == at(2026, 7, 20)


@pytest.mark.parametrize(
    ("start", "months", "end"),
    [
        (at(2026, 10, 31), 4, at(2027, 2, 28)),  # no 31 February: the month's last day
        (at(2027, 10, 31), 4, at(2028, 2, 29)),  # leap year
        (at(2026, 11, 30), 3, at(2027, 2, 28)),
        (at(2026, 12, 5), 1, at(2027, 1, 5)),  # across the year
        (at(2026, 8, 31), 5, at(2027, 1, 31)),
    ],
)
def test_months_are_calendar_months_clamped_to_the_month_end(start, months, end) -> None:
    assert add_months(start, months) == end


@given(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
    st.integers(min_value=0, max_value=24),
)
def test_a_window_is_never_shorter_than_its_months_minus_three_days(start, months) -> None:
    end = add_months(start, months)
    assert end >= start
    assert (end.year - start.year) * 12 + end.month - start.month == months
    assert start.day - end.day <= 3  # only clamping to a shorter month takes days off
