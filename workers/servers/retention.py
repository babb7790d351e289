"""Which snapshot sets to keep, the way AWS Data Lifecycle Manager does: by day and by week.

The newest set of each of the last `daily` days that have one, and the newest of each of the last
`weekly` ISO weeks that have one, are kept; so is the newest set of all, whatever the policy says.
Everything else may go. Pure: the callers list and delete.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime


def keep(times: Iterable[tuple[str, datetime]], *, daily: int, weekly: int) -> set[str]:
    """The ids to keep of the (id, taken at) pairs."""
    ordered = sorted(times, key=lambda t: (t[1], t[0]), reverse=True)
    if not ordered:
        return set()
    kept = {ordered[0][0]}
    for bucket, count in ((_day, daily), (_week, weekly)):
        seen: list[tuple[int, ...]] = []
        for snapshot_id, taken in ordered:
            period = bucket(taken)
            if period in seen:
                continue
            if len(seen) == count:
                break
            seen.append(period)
            kept.add(snapshot_id)
    return kept


def _day(moment: datetime) -> tuple[int, ...]:
    return (moment.year, moment.month, moment.day)


def _week(moment: datetime) -> tuple[int, ...]:
    iso = moment.isocalendar()
    return (iso.year, iso.week)
