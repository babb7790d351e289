"""Snapshot retention by day and week, like AWS Data Lifecycle Manager."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from workers.servers.retention import keep

START = datetime(2026, 11, 2, 3, 0, tzinfo=UTC)  # a Monday


def daily_sets(days: int) -> list[tuple[str, datetime]]:
    return [(f"s{i:03d}", START + timedelta(days=i)) for i in range(days)]


def test_seven_daily_and_four_weekly_of_forty_days() -> None:
    sets = daily_sets(40)
    kept = keep(sets, daily=7, weekly=4)
    newest_days = {f"s{i:03d}" for i in range(33, 40)}
    # the newest of each of the last four ISO weeks: Sundays (index 6, 13, ...) and the newest day
    weekly = {"s039", "s034", "s027", "s020"}
    assert kept == newest_days | weekly


def test_two_sets_a_day_keep_only_the_newest_of_each_day() -> None:
    sets = [(f"a{i}", START + timedelta(days=i)) for i in range(3)]
    sets += [(f"b{i}", START + timedelta(days=i, hours=6)) for i in range(3)]
    assert keep(sets, daily=2, weekly=0) == {"b2", "b1"}


def test_nothing_to_keep_from_nothing() -> None:
    assert keep([], daily=7, weekly=4) == set()


@given(
    st.lists(st.integers(min_value=0, max_value=24 * 90), min_size=1, max_size=60, unique=True),
    st.integers(min_value=0, max_value=10),
    st.integers(min_value=0, max_value=6),
)
def test_the_newest_set_is_always_kept_and_no_more_than_the_policy(hours, daily, weekly) -> None:
    sets = [(f"s{h:05d}", START + timedelta(hours=h)) for h in hours]
    kept = keep(sets, daily=daily, weekly=weekly)
    assert max(sets, key=lambda s: s[1])[0] in kept
    assert len(kept) <= max(daily + weekly, 1)
    assert kept <= {s for s, _ in sets}
