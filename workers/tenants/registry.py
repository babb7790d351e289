"""Which tenants exist: `[tenants.*]` in the config, plus the SaaS's accounts table read through ODBC.

A tenant is a customer account whose helpdesk lives in its own database on a target. The accounts query
is the SaaS's source of truth; the config is for tenants it does not list (and for tests and demos). A
tenant named in both is taken from the config, so an operator can pin one by hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyodbc

from deskvault_core.config import NAME_PATTERN, Settings, reserved_database
from deskvault_core.errors import DeskvaultError
from workers.errors import PermanentError

log = logging.getLogger(__name__)

# What the helpdesk calls a database name: PostgreSQL identifiers deskvault will quote but not invent.
_DATABASE_MAX = 63


class UnknownTenant(PermanentError):
    """An event names a tenant that neither the config nor the accounts table knows."""


class TenantConflict(PermanentError):
    """Two tenants name one database: neither is served until the accounts table (or config) is fixed."""


class AccountsQueryError(DeskvaultError):
    """The accounts database could not be read; retried, since it is usually a passing outage."""


@dataclass(frozen=True)
class Tenant:
    id: str
    plan: str
    database: str
    target: str
    downloadable_backups: bool
    source: str  # "config" or "accounts"


class TenantRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def all(self) -> list[Tenant]:
        """Every valid tenant, by id; invalid rows of the accounts table, and tenants that share a
        database, are logged and left out."""
        tenants, conflicts = self._listed()
        for why in dict.fromkeys(conflicts.values()):
            log.error("%s", why)
        return [t for t in tenants if t.id not in conflicts]

    def check(self) -> None:
        """TenantConflict naming both tenants if two share a database (at start-up)."""
        _, conflicts = self._listed()
        if conflicts:
            raise TenantConflict(next(iter(conflicts.values())))

    def sharing(self, target: str, database: str, but: str) -> list[str]:
        """The other tenants (besides `but`) whose database is `target`/`database`."""
        tenants, _ = self._listed()
        return [t.id for t in tenants if (t.target, t.database) == (target, database) and t.id != but]

    def get(self, tenant_id: str) -> Tenant:
        """The tenant `tenant_id`; UnknownTenant (naming the field `tenant`) if no source lists it, and
        TenantConflict if its database is another tenant's too."""
        tenants, conflicts = self._listed()
        if tenant_id in conflicts:
            raise TenantConflict(conflicts[tenant_id])
        for tenant in tenants:
            if tenant.id == tenant_id:
                return tenant
        sources = "[tenants.*] in the config" + (
            " or the accounts query" if self.settings.lifecycle.accounts_odbc else ""
        )
        raise UnknownTenant(f"tenant: {tenant_id!r} is not a known tenant (not in {sources})")

    def _listed(self) -> tuple[list[Tenant], dict[str, str]]:
        """Every tenant (the config's win over the accounts' of the same id), and for each tenant that
        shares its database with another, why it is refused."""
        found = {t.id: t for t in self._from_accounts()}
        found.update({t.id: t for t in self._from_config()})
        tenants = [found[k] for k in sorted(found)]
        by_database: dict[tuple[str, str], list[str]] = {}
        for t in tenants:
            by_database.setdefault((t.target, t.database), []).append(t.id)
        conflicts = {}
        for (target, database), ids in by_database.items():
            if len(ids) > 1:
                why = (
                    f"tenants {' and '.join(ids)} both name database {database!r} on target {target}: "
                    "refused, since a purge of one would drop the other's; fix the accounts table "
                    "(or [tenants.*]) so that each tenant has a database of its own"
                )
                conflicts.update(dict.fromkeys(ids, why))
        return tenants, conflicts

    def _from_config(self) -> list[Tenant]:
        return [
            Tenant(t.name, t.plan, t.database, t.target, t.downloadable_backups, "config")
            for t in self.settings.tenants.values()
        ]

    def _from_accounts(self) -> list[Tenant]:
        lifecycle = self.settings.lifecycle
        if not lifecycle.accounts_odbc:
            return []
        try:
            with pyodbc.connect(lifecycle.accounts_odbc, timeout=10) as conn:
                rows = conn.cursor().execute(lifecycle.accounts_query).fetchall()
        except pyodbc.Error as e:
            # The connection string may hold a password: name the failure, never the string.
            raise AccountsQueryError(
                f"lifecycle.accounts_query failed ({type(e).__name__}: {str(e.args[-1])[:300]}); check "
                "lifecycle.accounts_odbc and that the accounts database is reachable"
            ) from None
        tenants = []
        for number, row in enumerate(rows, 1):
            try:
                tenants.append(self._parse_row(row))
            except ValueError as e:
                log.warning("accounts query row %d left out: %s", number, e)
        return tenants

    def _parse_row(self, row: pyodbc.Row) -> Tenant:
        if len(row) != 5:
            raise ValueError(
                f"has {len(row)} columns; expected id, plan, downloadable_backups, database, target"
            )
        tenant_id, plan, entitled, database, target = (str(v).strip() if v is not None else "" for v in row)
        if not NAME_PATTERN.match(tenant_id):
            raise ValueError(f"id {tenant_id!r} is not a tenant id (lowercase letters, digits, - and _)")
        if not plan:
            raise ValueError(f"tenant {tenant_id}: plan is empty")
        if not database or len(database) > _DATABASE_MAX:
            raise ValueError(f"tenant {tenant_id}: database name {database!r} is empty or too long")
        if (why := reserved_database(database, self.settings.control_db)) is not None:
            raise ValueError(f"tenant {tenant_id}: database {why}, never a tenant's")
        if target not in self.settings.targets:
            raise ValueError(f"tenant {tenant_id}: target {target!r} is not a configured target")
        flag = entitled.lower()
        if flag not in ("1", "0", "true", "false", "t", "f"):
            raise ValueError(f"tenant {tenant_id}: downloadable_backups {entitled!r} is not true/false")
        return Tenant(tenant_id, plan, database, target, flag in ("1", "true", "t"), "accounts")
