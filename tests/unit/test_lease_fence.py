"""The lease fence: a job's writes stop once its lease has gone unrenewed too long or was taken."""

from __future__ import annotations

import time

import pytest

from workers.jobs import FENCE_SHARE, Lease, LeaseExpired
from workers.repository import fencing


def test_a_renewed_lease_lets_writes_through() -> None:
    lease = Lease("job-1", seconds=60)
    lease.check()
    lease.renewed()
    lease.check()


def test_a_lease_unrenewed_for_two_thirds_of_its_length_fences_writes_off() -> None:
    lease = Lease("job-1", seconds=0.3)
    time.sleep(0.3 * FENCE_SHARE + 0.05)
    with pytest.raises(LeaseExpired, match="lease not renewed"):
        lease.check()
    lease.renewed()
    lease.check()  # a renewal that lands in time lifts the fence


def test_a_lease_taken_by_another_worker_stays_fenced() -> None:
    lease = Lease("job-1", seconds=60)
    lease.lost = "lease lost to another worker"
    lease.renewed()
    with pytest.raises(LeaseExpired, match="another worker"):
        lease.check()


def test_the_fence_applies_inside_its_block_only() -> None:
    def refuse() -> None:
        raise LeaseExpired("fenced")

    fencing.current()()  # outside a job: no fence
    with fencing.fenced(refuse):
        with pytest.raises(LeaseExpired):
            fencing.current()()
    fencing.current()()
