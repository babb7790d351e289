"""One typed settings object, read from a TOML file and `DESKVAULT_*` environment variables.

Every key can be overridden from the environment: `DESKVAULT_<SECTION>__<KEY>`, and for named
entries `DESKVAULT_TARGETS__<NAME>__<KEY>` (double underscores separate levels). Validation happens
once, at start-up, and every error names the key it is about.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deskvault_core.errors import ConfigError

ENV_PREFIX = "DESKVAULT_"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

DEFAULT_SCHEDULE = {
    "full": "0 1 * * 0",  # Sunday 01:00 UTC
    "diff": "0 */2 * * *",
    "log": "0 * * * *",
    "snapshot": "0 3 * * *",
    "drill": "0 5 * * 6",  # Saturday 05:00: a restore drill per target each week
}


@dataclass(frozen=True)
class BrokerSettings:
    url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    delivery_limit: int = 5
    max_retries: int = 8
    # First retry after this many ms; dramatiq doubles it per attempt, up to max_backoff_ms.
    min_backoff_ms: int = 5000
    max_backoff_ms: int = 3600 * 1000
    # For an amqps:// url: the CA that signed the broker's certificate (default: the system's CAs).
    ca_bundle: str = ""


@dataclass(frozen=True)
class ControlDbSettings:
    odbc: str = "DRIVER={PostgreSQL Unicode};SERVER=127.0.0.1;PORT=5432;DATABASE=deskvault;UID=postgres;"
    lease_seconds: int = 120


@dataclass(frozen=True)
class RepositorySettings:
    bucket: str = "deskvault"
    prefix: str = ""
    endpoint: str = "http://127.0.0.1:8333"
    region: str = "us-east-1"
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    ca_bundle: str = ""
    key_file: str = ".deskvault/keys.json"
    zstd_level: int = 3
    # Compression threads: one per core by default (a backup is CPU-bound); 0 compresses in the caller.
    zstd_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    part_size_mib: int = 16
    upload_threads: int = 2


@dataclass(frozen=True)
class MetricsSettings:
    host: str = "127.0.0.1"
    port: int = 9310
    # The Prometheus that scrapes deskvault; `deskvault status` reads waits and failure rates from it.
    prometheus_url: str = ""


@dataclass(frozen=True)
class WalSettings:
    # Where streamed WAL waits for upload; per target in a sub-folder. Must survive a restart.
    spool_dir: str = ".deskvault/wal-spool"
    # How often arrived WAL (and the segment being written) is uploaded: the archive's worst-case lag.
    upload_interval_seconds: int = 5
    # `deskvault wal-stream` serves deskvault_wal_archived_timestamp_seconds (the live RPO) here.
    metrics_port: int = 9309


@dataclass(frozen=True)
class ScheduleSettings:
    full: str = DEFAULT_SCHEDULE["full"]
    diff: str = DEFAULT_SCHEDULE["diff"]
    log: str = DEFAULT_SCHEDULE["log"]
    drill: str = DEFAULT_SCHEDULE["drill"]


@dataclass(frozen=True)
class TargetSettings:
    name: str
    engine: str
    conninfo: str
    pg_bin: str = "/usr/lib/postgresql/15/bin"
    # The target's data directory, readable by deskvault: differential backups copy changed files from it.
    data_directory: str = ""
    # A differential with no full to extend: "refuse" (dead-lettered with the reason) or "full" (take one).
    diff_without_full: str = "refuse"
    # Retention: a full is kept while it is among the newest N or younger than the age; its differentials
    # and the WAL from the oldest kept full on are kept with it.
    retention_full_count: int = 5
    retention_full_max_age_days: int = 35
    # A cap on how fast a full backup reads the server, in MiB/s (pg_basebackup --max-rate); 0: none.
    full_max_rate_mib: int = 0
    # How a full is taken: "files" reads the data directory under the backup API, in parallel parts
    # (needs data_directory); "stream" through pg_basebackup; "auto": files when data_directory is set
    # and the server is a primary, else stream.
    full_method: str = "auto"
    # Parts of a file-level backup in flight at once; 0: one per core.
    backup_parallel: int = 0
    schedule: ScheduleSettings = ScheduleSettings()


@dataclass(frozen=True)
class ServerSettings:
    name: str
    schedule: str = DEFAULT_SCHEDULE["snapshot"]
    # "files": the directory trees in `paths`, snapshotted into the repository (deduplicated);
    # "ebs": the server's EBS volumes as one set, copied to a DR region. Empty: snapshot-due is refused.
    driver: str = ""
    paths: tuple[str, ...] = ()
    # Snapshot retention, like AWS Data Lifecycle Manager: the newest per day and per ISO week.
    keep_daily: int = 7
    keep_weekly: int = 4
    # ebs: the instance (its id, or a tag as "Key=Value"), its region, and the disaster-recovery region
    # the set is copied to, encrypted there with that region's KMS key. Checked when snapshot-due
    # arrives, so a server set up wrong is refused with the reason while the others carry on.
    instance_id: str = ""
    instance_tag: str = ""
    region: str = ""
    dr_region: str = ""
    dr_kms_key: str = ""
    ec2_endpoint: str = ""  # empty: AWS itself; set for an emulator


@dataclass(frozen=True)
class LifecycleSettings:
    # An expired paid account's data is kept this many months after it expired; a trial's, this many
    # months after the trial began (one month of trial plus four).
    paid_retention_months: int = 4
    trial_retention_months: int = 5
    # purge-upcoming is published this many days before a purge, so the SaaS can warn the customer.
    purge_notice_days: int = 7
    # How far ahead of this host's clock an account-expired event's expired_at may be.
    clock_skew_seconds: int = 300
    # Tenants besides [tenants.*]: read from the SaaS's accounts database through ODBC, if set.
    accounts_odbc: str = field(default="", repr=False)
    # Must return: id, plan, downloadable_backups (true/false or 1/0), database name, target.
    accounts_query: str = "SELECT id, plan, downloadable_backups, database_name, target FROM accounts"


@dataclass(frozen=True)
class DownloadSettings:
    # The read-only download endpoint for the admin panel's Import and Export page (HTTPS only).
    host: str = "127.0.0.1"
    port: int = 9443
    tls_cert: str = ""
    tls_key: str = ""
    # Signs download links and derives each tenant's API token; keep it secret, rotate to revoke all.
    link_secret: str = field(default="", repr=False)
    # The address clients reach the endpoint at, for the links it hands out.
    public_url: str = "https://127.0.0.1:9443"
    # An export can be downloaded this long after it was made; a link is valid this long after issue.
    export_ttl_days: int = 7
    link_ttl_minutes: int = 60
    # Entitled tenants (Company plan or the add-on) get a downloadable backup on this schedule (UTC);
    # the newest `scheduled_keep` are kept.
    scheduled: str = "30 2 * * *"
    scheduled_keep: int = 7
    # Limits that keep one slow or idle client from holding up anyone else (seconds, counts).
    handshake_timeout_seconds: int = 10  # a TLS handshake not done by then is dropped
    header_timeout_seconds: int = 10  # a request's headers must have arrived by then
    idle_timeout_seconds: int = 15  # a kept-alive connection with no new request is closed
    send_timeout_seconds: int = 60  # a download whose client reads nothing this long is cut off
    max_connections: int = 256  # connections beyond this are closed at once
    max_downloads: int = 16  # dumps streamed at once; more get 503 with Retry-After


@dataclass(frozen=True)
class TenantSettings:
    name: str
    plan: str
    database: str
    target: str
    # Entitled to scheduled downloadable backups (the Company plan or the add-on).
    downloadable_backups: bool = False


@dataclass(frozen=True)
class Settings:
    broker: BrokerSettings = BrokerSettings()
    control_db: ControlDbSettings = ControlDbSettings()
    repository: RepositorySettings = RepositorySettings()
    metrics: MetricsSettings = MetricsSettings()
    wal: WalSettings = WalSettings()
    lifecycle: LifecycleSettings = LifecycleSettings()
    downloads: DownloadSettings = DownloadSettings()
    targets: Mapping[str, TargetSettings] = field(default_factory=dict)
    servers: Mapping[str, ServerSettings] = field(default_factory=dict)
    tenants: Mapping[str, TenantSettings] = field(default_factory=dict)
    source: str = "(defaults)"

    def target(self, name: str) -> TargetSettings:
        try:
            return self.targets[name]
        except KeyError:
            known = ", ".join(sorted(self.targets)) or "none"
            raise ConfigError(
                f"targets.{name}: no such target in {self.source} (configured: {known})"
            ) from None


ENGINES = ("postgresql",)
SECTIONS = {
    "broker": BrokerSettings,
    "control_db": ControlDbSettings,
    "repository": RepositorySettings,
    "metrics": MetricsSettings,
    "wal": WalSettings,
    "lifecycle": LifecycleSettings,
    "downloads": DownloadSettings,
}


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read the TOML file (if any), apply environment overrides, validate, and return Settings."""
    env = os.environ if env is None else env
    path = path or env.get("DESKVAULT_CONFIG")
    raw: dict[str, Any] = {}
    source = "(defaults)"
    if path:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"config file {path} does not exist; pass --config or set DESKVAULT_CONFIG"
            ) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    _apply_env(raw, env)
    return _build(raw, source)


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == "DESKVAULT_CONFIG" or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {'.'.join(parts)} does not name a configuration key")
        node[parts[-1]] = value


def _build(raw: dict[str, Any], source: str) -> Settings:
    unknown = set(raw) - set(SECTIONS) - {"targets", "servers", "tenants"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section in {source}")
    sections = {name: _section(cls, raw.get(name, {}), name) for name, cls in SECTIONS.items()}
    sections["broker"] = _with_ca_bundle(sections["broker"])
    if sections["broker"].max_backoff_ms < sections["broker"].min_backoff_ms:
        raise ConfigError("broker.max_backoff_ms: must be at least broker.min_backoff_ms")
    _check_cron(sections["downloads"].scheduled, "downloads.scheduled")
    if sections["downloads"].scheduled_keep < 1:
        raise ConfigError("downloads.scheduled_keep: must be at least 1")
    _check_download_limits(sections["downloads"])
    targets = {name: _target(name, value) for name, value in _table(raw, "targets").items()}
    servers = {name: _server(name, value) for name, value in _table(raw, "servers").items()}
    tenants = {name: _tenant(name, value, targets) for name, value in _table(raw, "tenants").items()}
    _check_tenant_databases(tenants, sections["control_db"])
    return Settings(**sections, targets=targets, servers=servers, tenants=tenants, source=source)


def _with_ca_bundle(broker: BrokerSettings) -> BrokerSettings:
    """Carry broker.ca_bundle in the url, where pika reads TLS options, so every connection verifies."""
    if not broker.ca_bundle:
        return broker
    parsed = urllib.parse.urlsplit(broker.url)
    if parsed.scheme != "amqps":
        raise ConfigError("broker.ca_bundle: set, but broker.url is not amqps:// (TLS)")
    if not Path(broker.ca_bundle).is_file():
        raise ConfigError(f"broker.ca_bundle: {broker.ca_bundle} is not a readable file")
    options = repr({"cafile": broker.ca_bundle, "server_hostname": parsed.hostname})
    query = "&".join(q for q in (parsed.query, "ssl_options=" + urllib.parse.quote(options)) if q)
    return dataclasses.replace(broker, url=urllib.parse.urlunsplit(parsed._replace(query=query)))


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: must be a table of named entries")
    for entry in table:
        if not NAME_PATTERN.match(entry):
            raise ConfigError(f"{name}.{entry}: names are lowercase letters, digits, '-' and '_' (max 63)")
    return table


def _target(name: str, value: Any) -> TargetSettings:
    where = f"targets.{name}"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table")
    value = dict(value)
    schedule = _section(ScheduleSettings, value.pop("schedule", {}), f"{where}.schedule")
    for kind in ("full", "diff", "log", "drill"):
        _check_cron(getattr(schedule, kind), f"{where}.schedule.{kind}")
    target = _section(TargetSettings, {"name": name, **value}, where, schedule=schedule)
    if target.retention_full_count < 1:
        raise ConfigError(
            f"{where}.retention_full_count: must be at least 1 (the newest full is always kept)"
        )
    if isinstance(target.full_max_rate_mib, bool) or not 0 <= target.full_max_rate_mib <= 1024:
        raise ConfigError(f"{where}.full_max_rate_mib: must be a whole number of MiB/s from 1 to 1024, or 0")
    if target.full_method not in ("auto", "files", "stream"):
        raise ConfigError(f'{where}.full_method: must be "auto", "files" or "stream"')
    if target.full_method == "files" and not target.data_directory:
        raise ConfigError(
            f'{where}.full_method: "files" reads the data directory; set {where}.data_directory'
        )
    if isinstance(target.backup_parallel, bool) or not 0 <= target.backup_parallel <= 64:
        raise ConfigError(
            f"{where}.backup_parallel: must be a whole number from 1 to 64, or 0 (one per core)"
        )
    if target.diff_without_full not in ("refuse", "full"):
        raise ConfigError(f'{where}.diff_without_full: must be "refuse" or "full"')
    if target.engine not in ENGINES:
        raise ConfigError(
            f"{where}.engine: {target.engine!r} is not supported (supported: {', '.join(ENGINES)})"
        )
    return target


def _server(name: str, value: Any) -> ServerSettings:
    if not isinstance(value, dict):
        raise ConfigError(f"servers.{name}: must be a table")
    server = _section(ServerSettings, {"name": name, **value}, f"servers.{name}")
    _check_cron(server.schedule, f"servers.{name}.schedule")
    if server.driver not in ("", "files", "ebs"):
        raise ConfigError(f'servers.{name}.driver: must be "files" or "ebs", not {server.driver!r}')
    if server.driver == "files" and not server.paths:
        raise ConfigError(f"servers.{name}.paths: the files driver needs the directories to snapshot")
    for path in server.paths:
        if not os.path.isabs(path):
            raise ConfigError(f"servers.{name}.paths: {path!r} is not an absolute path")
    return server


def _tenant(name: str, value: Any, targets: Mapping[str, TargetSettings]) -> TenantSettings:
    if not isinstance(value, dict):
        raise ConfigError(f"tenants.{name}: must be a table")
    tenant = _section(TenantSettings, {"name": name, **value}, f"tenants.{name}")
    if tenant.target not in targets:
        known = ", ".join(sorted(targets)) or "none"
        raise ConfigError(f"tenants.{name}.target: {tenant.target!r} is not a configured target ({known})")
    return tenant


# A purge drops its tenant's database: these belong to the server or to deskvault, never to a tenant.
RESERVED_DATABASES = frozenset({"postgres", "template0", "template1"})


def control_database(control_db: ControlDbSettings) -> str:
    """The DATABASE of the control database's ODBC string ('' if it names none)."""
    for pair in control_db.odbc.split(";"):
        key, _, value = pair.partition("=")
        if key.strip().upper() == "DATABASE":
            return value.strip().strip("{}")
    return ""


def reserved_database(database: str, control_db: ControlDbSettings) -> str | None:
    """Why a tenant may not name `database`, or None."""
    if database.lower() in RESERVED_DATABASES:
        return f"{database!r} is the server's own database"
    if database == control_database(control_db):
        return f"{database!r} is deskvault's control database"
    return None


def _check_tenant_databases(tenants: Mapping[str, TenantSettings], control_db: ControlDbSettings) -> None:
    """Each tenant's database is its own: a purge of one must never drop another's, or the server's."""
    owners: dict[tuple[str, str], str] = {}
    for name, tenant in sorted(tenants.items()):
        if (why := reserved_database(tenant.database, control_db)) is not None:
            raise ConfigError(f"tenants.{name}.database: {why}; a tenant's database is dropped at its purge")
        if (other := owners.setdefault((tenant.target, tenant.database), name)) != name:
            raise ConfigError(
                f"tenants.{name}.database: {tenant.database!r} on target {tenant.target} is also tenant "
                f"{other}'s; two tenants never share a database (a purge of one would drop the other's)"
            )


def _check_download_limits(downloads: DownloadSettings) -> None:
    for name in (
        "handshake_timeout_seconds",
        "header_timeout_seconds",
        "idle_timeout_seconds",
        "send_timeout_seconds",
        "max_connections",
        "max_downloads",
    ):
        if getattr(downloads, name) < 1:
            raise ConfigError(f"downloads.{name}: must be at least 1")


def _check_cron(expression: str, where: str) -> None:
    from deskvault_core.cron import Cron, CronError

    try:
        Cron.parse(expression)
    except CronError as e:
        raise ConfigError(f"{where}: {e}") from None


def _section(cls: type, values: Any, where: str, **extra: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in extra}
    for key in values:
        if key not in fields:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in values:
            kwargs[name] = _coerce(values[name], f, f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: required")
    return cls(**kwargs, **extra)


def _coerce(value: Any, f: dataclasses.Field[Any], where: str) -> Any:
    expected = f.type if isinstance(f.type, str) else f.type.__name__
    if expected == "int":
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative")
        return value
    if expected == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"  # from an environment variable
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if expected == "tuple[str, ...]":
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if expected == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
        return value
    raise AssertionError(f"no coercion for {expected}")  # pragma: no cover
