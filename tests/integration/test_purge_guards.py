"""A purge drops its tenant's database: it must never drop one another tenant uses, the server's own or
deskvault's control database. Real PostgreSQL (target, control database, an accounts table read
through psqlODBC as the SaaS's would be), the clock injected."""

from __future__ import annotations

import dataclasses
import subprocess
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from support import clocked_context, run_cli

from deskvault_core.config import TenantSettings
from messages.events import AccountExpired, PurgeDue
from workers.errors import PermanentError
from workers.handlers.lifecycle import handle_account_expired
from workers.handlers.purge import handle_purge_due
from workers.tenants.registry import TenantConflict, TenantRegistry

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
PURGE_AFTER = datetime(2027, 4, 2, 12, 0, tzinfo=UTC)


def _sql(database: str, sql: str) -> None:
    command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"]
    subprocess.run([*command, "-d", database, "-c", sql], check=True, capture_output=True, timeout=60)


def _control_database(odbc: str) -> str:
    return next(p.split("=", 1)[1] for p in odbc.split(";") if p.upper().startswith("DATABASE="))


@pytest.fixture
def accounts(make_settings, control_db_odbc):
    """Settings whose accounts query reads a table of this test's own: (make(rows), table)."""
    table = f"accounts_{uuid.uuid4().hex[:8]}"
    columns = "id text, plan text, db text, target text"
    _sql(_control_database(control_db_odbc), f"CREATE TABLE {table} ({columns})")

    def make(rows: list[tuple[str, str]]):
        values = ", ".join(f"('{tenant}', 'team', '{db}', 'main')" for tenant, db in rows)
        _sql(_control_database(control_db_odbc), f"DELETE FROM {table}; INSERT INTO {table} VALUES {values}")
        query = f"SELECT id, plan, false, db, target FROM {table}"
        return make_settings(
            extra=f'[lifecycle]\naccounts_odbc = "{control_db_odbc}"\naccounts_query = "{query}"\n'
        )

    return make


def test_two_accounts_naming_one_database_are_refused_at_start_up_and_per_event(
    accounts, control_db_odbc
) -> None:
    suffix = uuid.uuid4().hex[:6]
    one, two, fine = f"globex-{suffix}", f"initech-{suffix}", f"acme2-{suffix}"
    settings = accounts(
        [
            (one, "shared_db"),
            (two, "shared_db"),
            (fine, f"own_{suffix}"),
            (f"sys-{suffix}", "postgres"),  # the server's own: never a tenant's
            (f"ctl-{suffix}", _control_database(control_db_odbc)),  # deskvault's own
        ]
    )
    # The worker and the scheduler refuse to start, naming both
    for command in (("worker", "--burst", "--no-metrics"), ("scheduler", "--once")):
        started = run_cli(settings, *command)
        assert started.returncode != 0
        assert f"tenants {one} and {two} both name database 'shared_db' on target main" in started.stderr
    # And per event neither is served, while the others are
    registry = TenantRegistry(settings)
    with pytest.raises(TenantConflict, match=f"tenants {one} and {two} both name database 'shared_db'"):
        registry.get(two)
    served = {t.id for t in registry.all()}
    assert fine in served and not served & {one, two, f"sys-{suffix}", f"ctl-{suffix}"}


def test_a_purge_refuses_a_database_another_unpurged_tenant_uses(make_settings, pg_target, accounts) -> None:
    # Given tenant A, expired with its database recorded, whose database the accounts now give to B
    a, b = f"a{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:8]}"
    database = f"db_{a}"
    pg_target.psql(f"CREATE DATABASE {database}")
    ctx, clock = clocked_context(
        make_settings(extra=f'[tenants.{a}]\nplan = "company"\ndatabase = "{database}"\ntarget = "main"\n'),
        NOW,
    )
    handle_account_expired(ctx, AccountExpired.new(tenant=a, plan="paid", expired_at=NOW))
    ctx, clock = clocked_context(accounts([(b, database)]), NOW)
    clock.now = PURGE_AFTER + timedelta(hours=1)

    # When A's purge is due, then it is refused naming B, nothing is dropped, the account is unchanged
    with pytest.raises(PermanentError, match=rf"database main/{database} is also used by tenant {b}"):
        handle_purge_due(ctx, PurgeDue.new(tenant=a, purge_after=PURGE_AFTER))
    assert pg_target.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{database}'").strip() == "1"
    assert ctx.ledger.account(a)["status"] == "expired"
    pg_target.psql(f"DROP DATABASE {database}")


@pytest.mark.parametrize("database", ["postgres", "template1", "CONTROL"])
def test_a_purge_never_drops_the_servers_or_deskvaults_own_database(
    make_settings, pg_target, control_db_odbc, database
) -> None:
    database = _control_database(control_db_odbc) if database == "CONTROL" else database
    tenant = f"r{uuid.uuid4().hex[:8]}"
    # (the config refuses such a tenant; here one reaches the ledger anyway, as an old record would)
    settings = make_settings()
    settings = dataclasses.replace(
        settings, tenants={tenant: TenantSettings(tenant, "company", database, "main")}
    )
    ctx, clock = clocked_context(settings, NOW)
    handle_account_expired(ctx, AccountExpired.new(tenant=tenant, plan="paid", expired_at=NOW))
    clock.now = PURGE_AFTER + timedelta(hours=1)
    refused = rf"database '{database}' is (the server's own|deskvault's control)"
    with pytest.raises(PermanentError, match=refused):
        handle_purge_due(ctx, PurgeDue.new(tenant=tenant, purge_after=PURGE_AFTER))
    assert ctx.ledger.account(tenant)["status"] == "expired"
    assert pg_target.psql("SELECT count(*) FROM pg_database WHERE datname = 'template1'").strip() == "1"
