"""A tenant's database restored to a moment on its live target, beside the current one or in its place.

`deskvault tenants restore` and the handler of `tenant-restore-requested` (workers.handlers.tenant_restore,
once per request, ending with the outbound `tenant-restored`) both run `restore_tenant`:
1. Refuse, before anything is downloaded: an unknown or purged tenant, a moment outside the restorable
   window, a name for the copy that is taken (by anything but this request's own copy), a replace while
   sessions use the database (unless `force`).
2. Restore the tenant's target to the moment in a scratch server, that database alone where its backups
   allow (see `engines.postgresql.subset`); the scratch server is closed to other users, as every
   restored cluster, and removed afterwards.
3. Copy the database into the live target under the new name (pg_dump straight into pg_restore).
4. Replace: the current database is renamed aside (kept until the operator drops it) and the copy takes
   its name, in one step.
A failure leaves the live target as it was. A redelivered request finds its own copy by the note the
engine leaves on it: a finished copy is not made again, a half one is made again, a done swap stays done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from workers.context import WorkerContext
from workers.engines.base import Engine, RestorePlan, Unreachable
from workers.engines.registry import engine_for
from workers.errors import PermanentError
from workers.tenants.registry import Tenant, TenantRegistry

log = logging.getLogger(__name__)
audit = logging.getLogger("deskvault.audit")

SIDE_BY_SIDE, REPLACE = "side-by-side", "replace"
MODES = (SIDE_BY_SIDE, REPLACE)
NAME_MAX = 63  # bytes in a PostgreSQL identifier
RESERVED = ("postgres", "template0", "template1")


@dataclass(frozen=True)
class TenantRestoreRequest:
    tenant: str
    at: datetime
    mode: str = SIDE_BY_SIDE
    as_name: str | None = None  # side by side: the copy's name (default `<db>_restored_<moment>`)
    force: bool = False  # replace: terminate the sessions that use the database
    request_id: str = ""
    requested_by: str = ""
    requested_at: datetime | None = None  # names the database put aside; default: now


@dataclass(frozen=True)
class TenantRestored:
    tenant: str
    target: str
    mode: str
    database: str  # the tenant's database on the target
    restored_as: str  # the database now holding the data as of the moment
    put_aside_as: str | None  # replace: where the database that was current went
    asked_at: datetime
    reached_at: datetime | None  # the commit time replay stopped after (None: the backup's own point)
    reached_xid: int | None
    stop: str  # exactly where replay stopped, for people
    dump_bytes: int
    seconds: float
    request_id: str
    requested_by: str

    def summary(self) -> str:
        aside = f"; the previous database kept as {self.put_aside_as}" if self.put_aside_as else ""
        return (
            f"tenant {self.tenant} restored to {self.stop} as database {self.restored_as} on target "
            f"{self.target}{aside} ({self.seconds:.1f} s)"
        )

    def as_json(self) -> dict[str, Any]:
        found = asdict(self)
        for key in ("asked_at", "reached_at"):
            if found[key] is not None:
                found[key] = f"{found[key]:%Y-%m-%dT%H:%M:%S.%fZ}"
        return found


@dataclass(frozen=True)
class Prepared:
    """A request found servable: its tenant, engine, names and plan."""

    tenant: Tenant
    engine: Engine
    at: datetime
    new_name: str
    aside: str
    plan: RestorePlan


def prepare(ctx: WorkerContext, request: TenantRestoreRequest) -> Prepared:
    """The request checked against the config, the ledger and the catalog, before anything is
    downloaded or made; PermanentError names the field that cannot be served."""
    tenant = _servable(ctx, request)
    engine = engine_for(ctx.settings.target(tenant.target))
    at = request.at.astimezone(UTC)
    new_name = request.as_name or derived_name(tenant.database, "restored", at)
    aside = derived_name(tenant.database, "before_restore", request.requested_at or datetime.now(UTC))
    _check_name(ctx, new_name, tenant)
    return Prepared(tenant, engine, at, new_name, aside, _plan(ctx, engine, at))


def restore_tenant(
    ctx: WorkerContext,
    request: TenantRestoreRequest,
    on_progress: Callable[[str], None] = log.info,
    prepared: Prepared | None = None,
) -> TenantRestored:
    started, started_at = time.monotonic(), ctx.ledger.now()
    prepared = prepared or prepare(ctx, request)
    tenant, engine, at, plan = prepared.tenant, prepared.engine, prepared.at, prepared.plan
    new_name, aside = prepared.new_name, prepared.aside
    done = _already_done(engine, request, tenant, new_name, aside)
    copied = 0
    if done is None:
        if request.mode == REPLACE and not request.force and (n := engine.sessions(tenant.database)):
            raise PermanentError(
                f"mode: database {tenant.database} has {n} session(s) connected; stop the application's "
                "use of it, or pass --force (force: true) to terminate them"
            )
        copied = _restore_copy(ctx, engine, plan, tenant, new_name, request, on_progress)
        done = "copied"
    if request.mode == REPLACE and done == "copied":
        on_progress(f"putting {new_name} in place of {tenant.database} ({tenant.database} becomes {aside})")
        try:
            engine.swap_in(tenant.database, new_name, aside, force=request.force)
        except BaseException:
            engine.drop_database(new_name)  # the live target as it was
            raise
    result = TenantRestored(
        tenant=tenant.id,
        target=tenant.target,
        mode=request.mode,
        database=tenant.database,
        restored_as=tenant.database if request.mode == REPLACE else new_name,
        put_aside_as=aside if request.mode == REPLACE else None,
        asked_at=at,
        reached_at=plan.stop.commit.at if plan.stop.commit else None,
        reached_xid=plan.stop.commit.xid if plan.stop.commit else None,
        stop=plan.stop.what,
        dump_bytes=copied,
        seconds=round(time.monotonic() - started, 1),
        request_id=request.request_id,
        requested_by=request.requested_by,
    )
    _record(ctx, result, started_at)
    return result


def derived_name(database: str, what: str, moment: datetime) -> str:
    """`<database>_<what>_<YYYYMMDDTHHMMSSZ>`, the database's part cut so that it fits an identifier."""
    suffix = f"_{what}_{moment.astimezone(UTC):%Y%m%dT%H%M%SZ}"
    head = database.encode()[: NAME_MAX - len(suffix)].decode(errors="ignore")
    return head + suffix


def _servable(ctx: WorkerContext, request: TenantRestoreRequest) -> Tenant:
    if request.mode not in MODES:
        raise PermanentError(f"mode: {request.mode!r} is not one of {', '.join(MODES)}")
    if request.as_name is not None and request.mode == REPLACE:
        raise PermanentError("as: a replace keeps the database's own name; give --as only side by side")
    tenant = TenantRegistry(ctx.settings).get(request.tenant)
    account = ctx.ledger.account(tenant.id)
    if account is not None and account["status"] in ("purging", "purged"):
        raise PermanentError(f"tenant: {tenant.id} was purged; there is nothing left to restore")
    return tenant


def _check_name(ctx: WorkerContext, name: str, tenant: Tenant) -> None:
    if not name or len(name.encode()) > NAME_MAX or "\x00" in name:
        raise PermanentError(f"as: {name!r} is not a database name (1 to {NAME_MAX} bytes)")
    if name in RESERVED or name == tenant.database:
        raise PermanentError(f"as: {name!r} is the server's own or the tenant's current database")
    tenants = TenantRegistry(ctx.settings).all()
    if users := [t.id for t in tenants if t.target == tenant.target and t.database == name]:
        raise PermanentError(f"as: {name!r} is the database of tenant {users[0]}")


def _plan(ctx: WorkerContext, engine: Engine, at: datetime) -> RestorePlan:
    try:
        return engine.plan_restore(ctx.repository, at)
    except Unreachable as e:
        raise PermanentError(f"at: {e}") from None


def _already_done(
    engine: Engine, request: TenantRestoreRequest, tenant: Tenant, new_name: str, aside: str
) -> str | None:
    """What an earlier attempt of this request finished: "copied", "swapped", or None (start afresh,
    after dropping a half-made copy of its own). Refuses a name someone else's database holds."""
    ours = f"tenant restore {request.request_id}: "
    if request.mode == REPLACE and ours in (engine.database_note(tenant.database) or ""):
        return "swapped"  # the restored copy already has the tenant's name
    note = engine.database_note(new_name)
    if note is None:
        if request.mode == REPLACE and engine.database_note(aside) is not None:
            raise PermanentError(
                f"mode: database {aside} already exists: another replace of {tenant.id} ran this second"
            )
        return None
    if ours not in note:
        raise PermanentError(
            f"as: database {new_name} already exists on target {tenant.target}; choose another name with "
            "--as (as_name), or drop it"
        )
    if note.endswith("complete"):
        return "copied"
    engine.drop_database(new_name)  # a copy this request's earlier attempt did not finish
    return None


def _restore_copy(
    ctx: WorkerContext,
    engine: Engine,
    plan: RestorePlan,
    tenant: Tenant,
    new_name: str,
    request: TenantRestoreRequest,
    on_progress: Callable[[str], None],
) -> int:
    on_progress(f"restoring target {tenant.target} to {plan.stop.what}, database {tenant.database} alone")
    with engine.scratch_server(f"tenant-{tenant.id}") as server:
        engine.restore(
            ctx.repository,
            plan,
            server.datadir,
            start=True,
            port=server.port,
            on_progress=on_progress,
            database=tenant.database,
            throwaway=True,
        )
        on_progress(f"copying {tenant.database} as of that moment into {new_name} on target {tenant.target}")
        progress = _Throttled(on_progress)
        copied = engine.copy_in(server, tenant.database, new_name, request.request_id, progress)
    on_progress(f"copied: {copied / 2**20:.1f} MiB of dump")
    return copied


class _Throttled:
    """Progress of the copy, a line every few seconds."""

    def __init__(self, emit: Callable[[str], None], interval: float = 3.0) -> None:
        self.emit, self.interval = emit, interval
        self.started = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            rate = done / 2**20 / max(now - self.started, 1e-6)
            self.emit(f"copying: {done / 2**20:.0f} MiB of dump so far ({rate:.1f} MiB/s)")


def _record(ctx: WorkerContext, result: TenantRestored, started_at: datetime) -> None:
    ctx.ledger.record_tenant_restore(
        {
            "request_id": result.request_id,
            "tenant": result.tenant,
            "target": result.target,
            "mode": result.mode,
            "requested_by": result.requested_by,
            "asked_at": result.asked_at,
            "reached_at": result.reached_at,
            "reached_xid": result.reached_xid,
            "restored_as": result.restored_as,
            "put_aside_as": result.put_aside_as,
            "started_at": started_at,
            "finished_at": ctx.ledger.now(),
            "detail": result.stop,
        }
    )
    audit.info(
        "tenant restore %s by %s: tenant %s (%s/%s) %s to %s, stopped at %s; restored as %s%s",
        result.request_id,
        result.requested_by,
        result.tenant,
        result.target,
        result.database,
        result.mode,
        f"{result.asked_at:%Y-%m-%dT%H:%M:%SZ}",
        result.stop,
        result.restored_as,
        f", the previous database kept as {result.put_aside_as}" if result.put_aside_as else "",
    )
