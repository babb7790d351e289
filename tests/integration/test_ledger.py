"""The ledger against a real PostgreSQL through psqlODBC: atomic claims, duplicates, lease takeover."""

from __future__ import annotations

import subprocess
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from workers.ledger.ledger import LeaseLost, Ledger
from workers.ledger.schema import SCHEMA_VERSION

SYSTEM_PG = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(control_db_odbc: str, clock: Clock) -> Ledger:
    ledger = Ledger(control_db_odbc, clock=clock, lease_seconds=60)
    ledger.migrate()
    return ledger


def claim(ledger: Ledger, key: str, owner: str):
    return ledger.claim(key, pool="backup", event_type="backup-due", event_id="e-" + owner, owner=owner)


def test_migrate_is_idempotent_and_reports_the_version(ledger: Ledger) -> None:
    assert ledger.migrate() == SCHEMA_VERSION
    assert ledger.schema_version() == SCHEMA_VERSION


def test_processes_starting_together_on_a_new_database_all_migrate_cleanly() -> None:
    # Given a brand-new control database and five workers starting at the same moment
    name = f"dvtest_fresh_{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["psql", "-X", "-q", "-d", SYSTEM_PG, "-c", f"CREATE DATABASE {name}"],
        check=True,
        capture_output=True,
    )
    odbc = f"DRIVER={{PostgreSQL Unicode}};SERVER=127.0.0.1;PORT=5432;DATABASE={name};UID=postgres;"
    try:
        versions: list[int] = []
        errors: list[BaseException] = []

        def start() -> None:
            try:
                versions.append(Ledger(odbc).migrate())
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=start) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        # Then every one of them finds the schema in place, created once
        assert errors == []
        assert versions == [SCHEMA_VERSION] * 5
    finally:
        subprocess.run(
            ["psql", "-X", "-q", "-d", SYSTEM_PG, "-c", f"DROP DATABASE {name} WITH (FORCE)"],
            capture_output=True,
        )


def test_first_claim_wins_and_a_finished_job_is_a_duplicate(ledger: Ledger, unique_key: str) -> None:
    assert claim(ledger, unique_key, "w1").status == "claimed"
    busy = claim(ledger, unique_key, "w2")
    assert busy.status == "busy"
    assert busy.lease_expires_at is not None

    ledger.complete(unique_key, "w1", "stored")

    assert claim(ledger, unique_key, "w2").status == "duplicate"
    job = ledger.job(unique_key)
    assert job is not None
    assert (job.state, job.attempts, job.outcome, job.lease_owner) == ("done", 1, "stored", None)


def test_a_stale_lease_is_taken_over_and_the_old_owner_is_fenced_out(
    ledger: Ledger, clock: Clock, unique_key: str
) -> None:
    assert claim(ledger, unique_key, "w1").status == "claimed"
    clock.now += timedelta(seconds=61)  # w1 died: its lease ran out

    takeover = claim(ledger, unique_key, "w2")

    assert takeover.status == "claimed"
    assert takeover.attempts == 2
    with pytest.raises(LeaseLost):
        ledger.complete(unique_key, "w1", "late result")
    with pytest.raises(LeaseLost):
        ledger.renew(unique_key, "w1")
    ledger.complete(unique_key, "w2", "stored")
    assert ledger.job(unique_key).outcome == "stored"


def test_renewing_keeps_the_job(ledger: Ledger, clock: Clock, unique_key: str) -> None:
    claim(ledger, unique_key, "w1")
    clock.now += timedelta(seconds=50)
    ledger.renew(unique_key, "w1")
    clock.now += timedelta(seconds=50)  # 100 s after the claim, 50 s after the renewal

    assert claim(ledger, unique_key, "w2").status == "busy"


def test_a_failed_job_can_be_claimed_again_at_once(ledger: Ledger, unique_key: str) -> None:
    claim(ledger, unique_key, "w1")
    ledger.fail(unique_key, "w1", "S3 unreachable")
    assert ledger.job(unique_key).last_error == "S3 unreachable"

    again = claim(ledger, unique_key, "w2")

    assert (again.status, again.attempts) == ("claimed", 2)


def test_concurrent_claims_give_exactly_one_winner(ledger: Ledger, unique_key: str) -> None:
    results: list[str] = []

    def contender(i: int) -> None:
        results.append(claim(ledger, unique_key, f"w{i}").status)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(results) == ["busy"] * 7 + ["claimed"]


def test_account_events_are_recorded_once(ledger: Ledger, unique_key: str) -> None:
    tenant = "t" + unique_key[-10:]
    at = datetime(2026, 11, 1, tzinfo=UTC)
    kwargs = dict(
        tenant=tenant,
        event_type="account-expired",
        event_id=unique_key,
        occurred_at=at,
        plan="paid",
        status="expired",
        expired_at=at,
        trial_started_at=None,
        purge_after=datetime(2027, 3, 1, tzinfo=UTC),
        allowed_from=("active", "expired"),
        detail="{}",
    )

    assert ledger.record_account_event(**kwargs) is True
    assert ledger.record_account_event(**kwargs) is False
    account = ledger.account(tenant)
    assert account is not None
    assert (account["status"], account["plan"], account["expired_at"]) == ("expired", "paid", at)
    assert account["purge_after"] == datetime(2027, 3, 1, tzinfo=UTC)


def test_schedule_marks_are_shared_between_schedulers(ledger: Ledger, unique_key: str) -> None:
    slot = datetime(2026, 11, 22, 1, 0, tzinfo=UTC)
    assert not ledger.was_emitted(unique_key, "full", slot)
    ledger.mark_emitted(unique_key, "full", slot, "k1")
    ledger.mark_emitted(unique_key, "full", slot, "k1")  # a second replica: no error, no second row
    assert ledger.was_emitted(unique_key, "full", slot)
