"""Account lifecycle against the real control database (psqlODBC), with the clock injected.

Tenants come from the config and from an accounts table the test creates in PostgreSQL, read through
ODBC exactly as deskvault reads the SaaS's accounts database.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from support import clocked_context, run_cli

from messages.events import AccountExpired, AccountReactivated
from workers.errors import PermanentError
from workers.handlers.lifecycle import handle_account_expired, handle_account_reactivated
from workers.tenants.registry import AccountsQueryError, TenantRegistry, UnknownTenant

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def _database(odbc: str) -> str:
    return next(p.split("=", 1)[1] for p in odbc.split(";") if p.upper().startswith("DATABASE="))


def _psql(database: str, sql: str) -> None:
    subprocess.run(
        [
            "psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            sql,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def tenants() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"paid-{suffix}", f"trial-{suffix}"


@pytest.fixture
def lifecycle(make_settings, tenants):
    """A worker context whose ledger reads the injected clock; two tenants of this test's own."""
    paid, trial = tenants
    extra = "".join(
        f'[tenants.{name}]\nplan = "{plan}"\ndatabase = "{name}"\ntarget = "main"\n'
        for name, plan in ((paid, "company"), (trial, "trial"))
    )
    settings = make_settings(extra=extra)
    ctx, clock = clocked_context(settings, NOW)
    return ctx, clock


def test_expiry_then_reactivation_inside_the_window_keeps_the_account(lifecycle, tenants) -> None:
    ctx, clock = lifecycle
    paid, _ = tenants
    expired = AccountExpired.new(tenant=paid, plan="paid", expired_at=NOW - timedelta(days=3))
    outcome = handle_account_expired(ctx, expired)
    assert "kept until 2027-03-29T12:00:00Z" in outcome
    account = ctx.ledger.account(paid)
    assert account["status"] == "expired"
    assert account["purge_after"] == datetime(2027, 3, 29, 12, 0, tzinfo=UTC)

    clock.now = NOW + timedelta(days=90)  # well inside the four months
    reactivated = AccountReactivated.new(tenant=paid, occurred_at=clock.now)
    outcome = handle_account_reactivated(ctx, reactivated)
    assert "purge planned for 2027-03-29T12:00:00Z is cancelled" in outcome
    account = ctx.ledger.account(paid)
    assert (account["status"], account["purge_after"], account["purged_at"]) == ("active", None, None)


def test_a_trial_is_kept_five_months_from_its_start(lifecycle, tenants) -> None:
    ctx, _ = lifecycle
    _, trial = tenants
    started = datetime(2026, 10, 20, tzinfo=UTC)
    event = AccountExpired.new(
        tenant=trial, plan="trial", expired_at=started + timedelta(days=30), trial_started_at=started
    )
    handle_account_expired(ctx, event)
    assert ctx.ledger.account(trial)["purge_after"] == datetime(2027, 3, 20, tzinfo=UTC)


def test_the_same_expiry_delivered_twice_has_one_effect(lifecycle, tenants) -> None:
    ctx, clock = lifecycle
    paid, _ = tenants
    event = AccountExpired.new(tenant=paid, plan="paid", expired_at=NOW - timedelta(hours=1))
    assert handle_account_expired(ctx, event) is not None
    clock.now = NOW + timedelta(minutes=5)
    assert handle_account_expired(ctx, event) is None  # a duplicate: skipped
    assert ctx.ledger.account(paid)["last_event_id"] == event.event_id


def test_an_unknown_tenant_is_refused_and_nothing_is_recorded(lifecycle) -> None:
    ctx, _ = lifecycle
    event = AccountExpired.new(tenant="nobody-here", plan="paid", expired_at=NOW - timedelta(days=1))
    with pytest.raises(UnknownTenant, match=r"tenant: 'nobody-here' is not a known tenant"):
        handle_account_expired(ctx, event)
    assert ctx.ledger.account("nobody-here") is None
    assert ctx.ledger.job(event.idempotency_key) is None


def test_an_expiry_in_the_future_is_refused_and_nothing_is_recorded(lifecycle, tenants) -> None:
    ctx, _ = lifecycle
    paid, _ = tenants
    event = AccountExpired.new(tenant=paid, plan="paid", expired_at=NOW + timedelta(days=2))
    with pytest.raises(PermanentError, match=r"expired_at: 2026-12-04T12:00:00Z is in the future"):
        handle_account_expired(ctx, event)
    assert ctx.ledger.account(paid) is None


def test_reactivating_a_purged_account_is_refused_and_leaves_it_purged(lifecycle, tenants) -> None:
    ctx, _ = lifecycle
    paid, _ = tenants
    handle_account_expired(
        ctx, AccountExpired.new(tenant=paid, plan="paid", expired_at=NOW - timedelta(days=200))
    )
    # The purge itself is the lifecycle sweeper's (not built yet): mark the account as it leaves it.
    purged_at = "2026-11-30 00:00:00"
    _psql(
        _database(ctx.settings.control_db.odbc),
        f"UPDATE dv_accounts SET status = 'purged', purged_at = '{purged_at}' WHERE tenant = '{paid}'",
    )
    event = AccountReactivated.new(tenant=paid, occurred_at=NOW)
    with pytest.raises(
        PermanentError, match=rf"tenant: {paid} was purged at 2026-11-30T00:00:00Z; its data is gone"
    ):
        handle_account_reactivated(ctx, event)
    assert ctx.ledger.account(paid)["status"] == "purged"
    # The refused event left no account-event row: the whole transaction was rolled back.
    assert ctx.ledger.account(paid)["last_event_id"] != event.event_id


def test_tenants_come_from_the_accounts_table_and_the_config(make_settings, control_db_odbc) -> None:
    table = f"accounts_{uuid.uuid4().hex[:8]}"
    database = _database(control_db_odbc)
    _psql(
        database,
        f"CREATE TABLE {table} (id text, plan text, addon_backups boolean, dbname text, target text);"
        f"INSERT INTO {table} VALUES ('globex', 'company', false, 'globex_db', 'main'),"
        " ('initech', 'team', true, 'initech_db', 'main'),"
        " ('Bad Name', 'team', false, 'x', 'main'),"  # not a tenant id: left out
        " ('ghost', 'team', false, 'ghost', 'nowhere'),"  # unknown target: left out
        " ('acme', 'team', false, 'other', 'main')",  # also in the config, which wins
    )
    query = f"SELECT id, plan, plan = 'company' OR addon_backups, dbname, target FROM {table}"
    settings = make_settings(
        extra=f'[lifecycle]\naccounts_odbc = "{control_db_odbc}"\naccounts_query = "{query}"\n'
    )
    registry = TenantRegistry(settings)
    found = {t.id: (t.plan, t.downloadable_backups, t.database, t.source) for t in registry.all()}
    assert found == {
        "acme": ("company", True, "acme", "config"),
        "globex": ("company", True, "globex_db", "accounts"),
        "initech": ("team", True, "initech_db", "accounts"),
    }
    with pytest.raises(UnknownTenant, match="or the accounts query"):
        registry.get("ghost")


def test_an_unreadable_accounts_database_is_named_without_its_password(make_settings) -> None:
    odbc = (
        "DRIVER={PostgreSQL Unicode};SERVER=127.0.0.1;PORT=5432;DATABASE=no_such_db_x;UID=postgres;"
        "PWD=s3cret-pw;"
    )
    settings = make_settings(extra=f'[lifecycle]\naccounts_odbc = "{odbc}"\n')
    with pytest.raises(AccountsQueryError, match=r"lifecycle\.accounts_query failed") as caught:
        TenantRegistry(settings).all()
    assert "s3cret-pw" not in str(caught.value)


def test_tenants_list_shows_each_tenant_with_its_lifecycle_state(lifecycle, tenants) -> None:
    ctx, _ = lifecycle
    paid, trial = tenants
    handle_account_expired(
        ctx, AccountExpired.new(tenant=paid, plan="paid", expired_at=NOW - timedelta(days=1))
    )
    listed = run_cli(ctx.settings, "tenants", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["tenant"]: r for r in json.loads(listed.stdout)}
    assert rows[paid]["status"] == "expired"
    assert rows[paid]["purge_after"] == "2027-04-01T12:00:00Z"
    assert (rows[trial]["status"], rows[trial]["purge_after"]) == ("active", None)
    assert rows["acme"]["downloadable_backups"] is True

    table = run_cli(ctx.settings, "tenants", "list")
    assert table.returncode == 0, table.stderr
    assert any(
        line.split()[0] == paid and "2027-04-01T12:00:00Z" in line for line in table.stdout.splitlines()
    )


def test_legal_holds_are_placed_and_released_from_the_cli(lifecycle, tenants) -> None:
    ctx, _ = lifecycle
    paid, _ = tenants
    placed = run_cli(ctx.settings, "tenants", "hold", "--tenant", paid)
    assert placed.returncode == 0, placed.stderr
    assert ctx.ledger.account(paid)["legal_hold"] is True
    listed = json.loads(run_cli(ctx.settings, "tenants", "list", "--json").stdout)
    assert next(r for r in listed if r["tenant"] == paid)["legal_hold"] is True

    assert run_cli(ctx.settings, "tenants", "release", "--tenant", paid).returncode == 0
    assert ctx.ledger.account(paid)["legal_hold"] is False

    typo = run_cli(ctx.settings, "tenants", "hold", "--tenant", "no-such-tenant")
    assert typo.returncode != 0
    assert "'no-such-tenant' is not a known tenant" in typo.stderr
