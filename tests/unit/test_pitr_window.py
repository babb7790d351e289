"""The restorable window's stretches: a WAL gap splits it, and drills pick moments only inside it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from workers.engines.base import Window

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def test_points_skip_the_hole_between_stretches() -> None:
    # Given two one-hour stretches with a day-long hole between them
    first, second = (T0, T0 + timedelta(hours=1)), (T0 + timedelta(days=1), T0 + timedelta(days=1, hours=1))
    window = Window(T0, second[1], (first, second))

    # Then fractions of the restorable time map into the stretches, never into the hole
    assert window.point_at(0) == T0
    assert window.point_at(0.25) == T0 + timedelta(minutes=30)
    assert window.point_at(0.75) == second[0] + timedelta(minutes=30)
    assert window.point_at(1) == second[1]
    for i in range(101):
        point = window.point_at(i / 100)
        assert first[0] <= point <= first[1] or second[0] <= point <= second[1]
