"""The ledger against a real PostgreSQL through psqlODBC: atomic claims, duplicates, lease takeover."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from support import scratch_database

from workers.ledger.ledger import LeaseLost, Ledger
from workers.ledger.schema import MIGRATIONS, SCHEMA_VERSION, statements

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["postgresql", "mariadb"])
def ledger(request: pytest.FixtureRequest, clock: Clock) -> Ledger:
    """The ledger on each control database deskvault supports, both real."""
    odbc = request.getfixturevalue(
        "control_db_odbc" if request.param == "postgresql" else "mariadb_control_odbc"
    )
    ledger = Ledger(odbc, clock=clock, lease_seconds=60)
    ledger.migrate()
    return ledger


def claim(ledger: Ledger, key: str, owner: str):
    return ledger.claim(key, pool="backup", event_type="backup-due", event_id="e-" + owner, owner=owner)


def test_migrate_is_idempotent_and_reports_the_version(ledger: Ledger) -> None:
    assert ledger.migrate() == SCHEMA_VERSION
    assert ledger.schema_version() == SCHEMA_VERSION


@pytest.mark.parametrize("engine", ["postgresql", "mariadb"])
def test_processes_starting_together_on_a_new_database_all_migrate_cleanly(engine: str) -> None:
    # Given a brand-new control database and five workers starting at the same moment
    with scratch_database(engine) as odbc:
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
        assert Ledger(odbc).schema_version() == SCHEMA_VERSION


def test_a_migration_that_stopped_midway_on_mariadb_completes_when_run_again() -> None:
    # Given a MariaDB control database where a first migration stopped after some of its tables: MariaDB
    # commits each CREATE TABLE by itself, so they stay, while the version was never recorded
    with scratch_database("mariadb") as odbc:
        first = Ledger(odbc)
        with first.transaction() as cur:
            cur.execute("CREATE TABLE dv_schema_version (version INTEGER NOT NULL PRIMARY KEY)")
            for statement in statements(MIGRATIONS[0][1], "mariadb")[:2]:  # dv_jobs and its index
                cur.execute(statement)
        assert first.schema_version() == 0

        # When a worker starts again, then the migration completes and is recorded once
        assert Ledger(odbc).migrate() == SCHEMA_VERSION
        with first.transaction() as cur:
            assert [r[0] for r in cur.execute("SELECT version FROM dv_schema_version ORDER BY version")] == [
                v for v, _ in MIGRATIONS
            ]


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


def test_backups_drills_usage_and_batched_marks_round_trip(
    ledger: Ledger, clock: Clock, unique_key: str
) -> None:
    target = "t" + unique_key[-10:]
    finished = datetime(2026, 12, 6, 3, 0, 1, 250000, tzinfo=UTC)
    for _ in range(2):  # a redelivery indexes nothing twice
        ledger.record_backup(
            target=target,
            backup_id="20261206T030000Z-full",
            kind="full",
            manifest_key=f"targets/{target}/backups/20261206T030000Z-full/manifest.dv",
            started_at=finished - timedelta(minutes=5),
            finished_at=finished,
            start_lsn="0/5000028",
            stop_lsn="0/5894AC0",
            plain_bytes=93_790_208,
            stored_bytes=25_235_337,
        )
    assert ledger.newest_backups()[(target, "full")] == finished  # microseconds and zone kept
    assert ledger.newest_backup_time(target, "full") == finished

    for succeeded in (True, False):
        ledger.record_drill(
            target=target,
            drill_id=f"{unique_key}-{succeeded}"[-64:],
            point_in_time=finished,
            succeeded=succeeded,
            duration_seconds=3,
            detail="x" * 5000,  # the long-text column
        )
        clock.now += timedelta(seconds=1)
    drill = ledger.newest_drills()[target]
    assert drill["succeeded"] is False and drill["passed_at"] is not None

    ledger.record_usage(target, "backups", 75, 816 * 2**20)
    ledger.record_usage(target, "backups", 76, 817 * 2**20)  # measured again: replaced
    assert (target, "backups", 76, 817 * 2**20) in ledger.repository_usage()

    slot = datetime(2026, 12, 6, 2, 30, tzinfo=UTC)
    ledger.mark_emitted(f"tenant:{target}-a", "export", slot, f"{unique_key}-a")
    ledger.mark_emitted_many("export", slot, [(f"tenant:{target}-{n}", f"{unique_key}-{n}") for n in "abc"])
    assert {s for s in ledger.emitted_subjects("export", slot) if target in s} == {
        f"tenant:{target}-{n}" for n in "abc"
    }
