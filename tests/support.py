"""Helpers shared by the integration tests (plain functions; the fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import boto3

from deskvault.local.certs import self_signed_cert  # noqa: F401 (the tests import it from here)
from deskvault_core.config import Settings, load_settings
from workers.context import WorkerContext, open_ledger, open_repository
from workers.engines.postgresql.cluster import free_port

T = TypeVar("T")
__all__ = ["build_settings", "free_port", "raw_s3", "run_cli", "wait_for", "worker_context"]


def build_settings(
    directory: Path,
    key_file: Path,
    s3: Any,
    rabbit_url: str,
    control_db_odbc: str,
    target: Any,
    *,
    servers: dict[str, str] | None = None,
    lease_seconds: int = 120,
    extra: str = "",
    target_options: str = "",
    retries: tuple[int, int, int] = (2, 200, 3_600_000),
) -> Settings:
    """A config file for the test services (a fresh bucket prefix each time), loaded like deskvault does.

    `target_options`: TOML lines for [targets.main] (such as `full_method = "stream"`)."""
    text = f"""
[broker]
url = "{rabbit_url}"
min_backoff_ms = {retries[1]}
max_backoff_ms = {retries[2]}
max_retries = {retries[0]}
[control_db]
odbc = "{control_db_odbc}"
lease_seconds = {lease_seconds}
[repository]
bucket = "deskvault-test"
prefix = "t-{uuid.uuid4().hex[:12]}/"
endpoint = "{s3.endpoint_url}"
access_key = "{s3.access_key}"
secret_key = "{s3.secret_key}"
key_file = "{key_file}"
part_size_mib = 5
[wal]
spool_dir = "{directory / f"wal-spool-{uuid.uuid4().hex[:6]}"}"
upload_interval_seconds = 1
[targets.main]
engine = "postgresql"
conninfo = "{target.conninfo}"
data_directory = "{target.datadir}"
{target_options}
[tenants.acme]
plan = "company"
database = "acme"
target = "main"
downloadable_backups = true
"""
    for name, schedule in (servers or {}).items():
        text += f'[servers.{name}]\nschedule = "{schedule}"\n'
    text += extra
    path = directory / f"deskvault-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    return load_settings(path, env={})


def worker_context(settings: Settings) -> WorkerContext:
    """What a worker process builds at start-up, against the test's services."""
    ledger = open_ledger(settings)
    ledger.migrate()
    repository = open_repository(settings)
    repository.store.ensure_bucket()
    return WorkerContext(settings=settings, ledger=ledger, repository=repository)


def take_backup(ctx: WorkerContext, kind: str, target: str = "main") -> str:
    """A worker's handling of a backup-due event for now, in this process; returns its outcome."""
    from messages.events import BackupDue
    from workers.handlers.backup import handle_backup_due

    event = BackupDue.new(
        target=target,
        kind=kind,
        slot=datetime.now(UTC).replace(microsecond=0),
        idempotency_key=f"test-{kind}-{uuid.uuid4().hex}",
    )
    return handle_backup_due(ctx, event)


@contextlib.contextmanager
def wal_streaming(ctx: WorkerContext, target: str = "main", *, connected: Any = None) -> Iterator[None]:
    """The target's WAL streamed into the repository by a streamer in this process, for the block;
    with `connected` (the target's PgCluster), the block starts once the streamer is connected to it."""
    import threading

    from workers.engines.postgresql.walstream import WalStreamer

    settings = ctx.settings
    spool = Path(settings.wal.spool_dir) / target
    streamer = WalStreamer(settings.target(target), ctx.repository, spool, upload_interval=1.0)
    stop = threading.Event()
    thread = threading.Thread(target=streamer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        if connected is not None:
            wait_for(
                lambda: connected.psql("SELECT count(*) FROM pg_stat_replication").strip() == "1",
                timeout=60,
                what="the WAL streamer to connect",
            )
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def tenants_cluster(scratch_dir: Path, name: str, tenants: tuple[str, ...], **initdb: Any) -> Any:
    """A new PostgreSQL cluster on TCP, started, with one helpdesk database per tenant."""
    from deskvault.local.demo_data import helpdesk_sql
    from workers.engines.postgresql.cluster import PgCluster

    source = PgCluster(scratch_dir / f"{name}-{uuid.uuid4().hex[:6]}", free_port(), tcp=True)
    source.initdb(**initdb)
    source.start()
    for tenant in tenants:
        source.psql(f"CREATE DATABASE {tenant}")
        source.psql(helpdesk_sql(tenant), tenant)
    return source


@contextlib.contextmanager
def marks_cluster(
    scratch_dir: Path, name: str, *, columns: str = "id int PRIMARY KEY", commit_timestamps: bool = True
) -> Iterator[Any]:
    """A new PostgreSQL cluster with an empty `marks` table, checkpointed and two seconds old.

    Files touched within a second of a full's start always go into the next differential (their
    modification time cannot prove them unchanged); a cluster any younger would make every file one.
    `commit_timestamps` lets tests read each row's commit time (`commit_times`).
    """
    from workers.engines.postgresql.cluster import PgCluster

    cluster = PgCluster(scratch_dir / f"{name}-{uuid.uuid4().hex[:6]}", free_port(), tcp=True)
    cluster.initdb(extra_conf="track_commit_timestamp = on\n" if commit_timestamps else "")
    cluster.start()
    try:
        cluster.psql(f"CREATE TABLE marks ({columns})")
        cluster.psql("CHECKPOINT")
        time.sleep(2)
        yield cluster
    finally:
        cluster.destroy()


def commit_times(cluster: Any) -> dict[int, datetime]:
    """Each `marks` row's id and the UTC time its transaction committed."""
    rows = cluster.psql("SELECT id, pg_xact_commit_timestamp(xmin) FROM marks ORDER BY id").splitlines()
    return {int(i): datetime.fromisoformat(ts).astimezone(UTC) for i, ts in (r.split("|") for r in rows)}


@contextlib.contextmanager
def streamed_target(
    directory: Path, source: Any, s3_endpoint: Any, rabbit_url: str, control_db_odbc: str
) -> Iterator[tuple[Settings, WorkerContext]]:
    """`source` as target main of a new repository (own key file), its WAL streamed from the moment the
    streamer has connected until the block ends."""
    from workers.repository.keyring import Keyring

    key_file = directory / "keys.json"
    Keyring.create(key_file)
    settings = build_settings(directory, key_file, s3_endpoint, rabbit_url, control_db_odbc, source)
    ctx = worker_context(settings)
    with wal_streaming(ctx, connected=source):
        yield settings, ctx


def restore_and_query(settings: Settings, into: Path, sql: str, dbname: str = "postgres") -> str:
    """`deskvault restore` of the target's latest moment into `into`, started: what `sql` returns there."""
    from workers.engines.postgresql.cluster import PgCluster

    restored = run_cli(settings, "restore", "--target", "main", "--into", str(into))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    cluster = PgCluster(into, free_port())
    cluster.start()
    try:
        return cluster.psql(sql, dbname).strip()
    finally:
        cluster.destroy()


def raw_s3(settings: Settings) -> Any:
    """A plain boto3 client on the repository's bucket, to look at (or damage) stored bytes directly."""
    r = settings.repository
    return boto3.client(
        "s3",
        endpoint_url=r.endpoint,
        aws_access_key_id=r.access_key,
        aws_secret_access_key=r.secret_key,
        region_name=r.region,
    )


def run_cli(
    settings: Settings, *args: str, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`deskvault --config <the test's file> ARGS...` as a user runs it, in a process of its own
    (in the folder `cwd`, default this one)."""
    return subprocess.run(
        [sys.executable, "-m", "deskvault.cli", "--config", str(settings.source), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def wait_for(probe: Callable[[], T | None], *, timeout: float = 30.0, what: str = "condition") -> T:
    """Poll until `probe` returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


class OutboundListener:
    """A queue of the test's own bound to deskvault's outbound exchange, as the SaaS would bind one."""

    def __init__(self, url: str, routing_key: str) -> None:
        import pika

        from messages.outbound import OUTBOUND_EXCHANGE

        self._connection = pika.BlockingConnection(pika.URLParameters(url))
        self._channel = self._connection.channel()
        self._channel.exchange_declare(OUTBOUND_EXCHANGE, exchange_type="topic", durable=True)
        self._queue = self._channel.queue_declare("", exclusive=True).method.queue
        self._channel.queue_bind(self._queue, OUTBOUND_EXCHANGE, routing_key=routing_key)

    def messages(self) -> list[dict[str, Any]]:
        """Every message received so far."""
        import json

        found = []
        while True:
            method, _, body = self._channel.basic_get(self._queue, auto_ack=True)
            if method is None:
                return found
            found.append(json.loads(body))

    def close(self) -> None:
        self._connection.close()


def exported_metric_names() -> set[str]:
    """Every sample name deskvault exports: the workers' metrics (counters' _total, histograms' _bucket)
    and the gauges the state collector reads at scrape time."""
    from prometheus_client import REGISTRY

    import workers.metrics  # noqa: F401 (registers every metric)
    from workers.state_metrics import GAUGES

    return {
        name
        for metric in REGISTRY.collect()
        for name in (metric.name, f"{metric.name}_total", f"{metric.name}_bucket")
    } | set(GAUGES)


class Clock:
    """A clock a test sets by hand: `clock.now = ...`."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def clocked_context(settings: Settings, now: datetime) -> tuple[WorkerContext, Clock]:
    """A worker context whose ledger reads an injected clock, and that clock."""
    from workers.ledger.ledger import Ledger

    clock = Clock(now)
    base = worker_context(settings)
    ledger = Ledger(settings.control_db.odbc, clock=clock)
    return WorkerContext(settings=settings, ledger=ledger, repository=base.repository), clock


OPS = Path(__file__).resolve().parents[1] / "ops"


def start_prometheus(
    directory: Path, worker_port: int, wal_port: int, *, rules_for: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Debian's Prometheus running ops/prometheus/prometheus.yml on these ports, scraping every second,
    with ops/prometheus/alerts.yml as shipped; `rules_for` shortens the named alerts' `for:`."""
    import yaml

    binary = shutil.which("prometheus")
    if binary is None:
        raise AssertionError(
            "prometheus is not installed: run ops/local/bootstrap.sh (Debian package prometheus)"
        )
    config = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {**config["global"], "scrape_interval": "1s", "evaluation_interval": "1s"}
    rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        rule["for"] = (rules_for or {}).get(rule["alert"], rule.get("for", "0s"))
    (directory / "alerts.yml").write_text(yaml.safe_dump(rules))
    config["rule_files"] = [str(directory / "alerts.yml")]
    ports = {"deskvault-workers": worker_port, "deskvault-wal-stream": wal_port}
    for job in config["scrape_configs"]:
        labels = job["static_configs"][0].get("labels", {})  # what the alerts find the processes by
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"], "labels": labels}]
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=(directory / "prometheus.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    return process, port


def prom_query(port: int, expr: str) -> list[Any]:
    """The result vector of an instant query; [] while Prometheus is not answering yet."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
    except OSError:
        return []
    assert body["status"] == "success", body
    return body["data"]["result"]


def alert_expression(name: str) -> str:
    """The expression of an alert rule in ops/prometheus/alerts.yml."""
    import yaml

    rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    return next(rule["expr"] for rule in rules if rule["alert"] == name).strip()


class TlsProxy:
    """TLS in front of a plain-text local service, as a load balancer would terminate it.

    This machine's RabbitMQ has no TLS listener (adding one means reconfiguring the system broker); this
    lets the tests check what deskvault controls -- that its client verifies the server's certificate.
    """

    def __init__(self, upstream_port: int, cert: Path, key: Path) -> None:
        import socket
        import ssl
        import threading

        self._upstream = upstream_port
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, socket), daemon=True).start()

    def _serve(self, client: Any, socket: Any) -> None:
        import threading

        try:
            secure = self._context.wrap_socket(client, server_side=True)
        except OSError:  # the client refused our certificate (or spoke no TLS)
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self._upstream))

        def pipe(source: Any, sink: Any) -> None:
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for s in (source, sink):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pipe, args=(upstream, secure), daemon=True).start()
        pipe(secure, upstream)

    def close(self) -> None:
        self._closed = True
        self._listener.close()


def deskvault_command(settings: Settings, *args: str) -> list[str]:
    """The command line of `deskvault --config <the test's file> ARGS...`, for a process of its own."""
    return [sys.executable, "-m", "deskvault.cli", "--config", str(settings.source), *args]


def start_deskvault(settings: Settings, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`deskvault ARGS...` (a worker, a WAL streamer) running in a process of its own, output to `log`."""
    return subprocess.Popen(
        deskvault_command(settings, *args), stdout=log.open("w"), stderr=subprocess.STDOUT
    )


MARIADB_SOCKET = "/run/mysqld/mysqld.sock"


def mariadb_database(name: str) -> str:
    """A new, empty database on the machine's MariaDB (as root over its socket); its ODBC string."""
    _mariadb(f"CREATE DATABASE {name}")
    return f"DRIVER={{MariaDB Unicode}};SERVER=localhost;SOCKET={MARIADB_SOCKET};DATABASE={name};UID=root;"


def drop_mariadb_database(name: str) -> None:
    _mariadb(f"DROP DATABASE IF EXISTS {name}")


def _mariadb(sql: str) -> None:
    subprocess.run(
        ["mysql", "--protocol=socket", f"--socket={MARIADB_SOCKET}", "-e", sql],
        check=True,
        capture_output=True,
        timeout=60,
    )


@contextlib.contextmanager
def rabbit_vhost(prefix: str) -> Iterator[str]:
    """A new, empty RabbitMQ vhost (guest may do anything in it), deleted afterwards; its AMQP url."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=60)


SYSTEM_PG = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@contextlib.contextmanager
def scratch_database(engine: str = "postgresql") -> Iterator[str]:
    """A new, empty database on the machine's PostgreSQL or MariaDB, dropped afterwards; its ODBC string."""
    name = f"dvtest_{uuid.uuid4().hex[:10]}"
    if engine == "mariadb":
        odbc = mariadb_database(name)
    else:
        _system_psql(f"CREATE DATABASE {name}", check=True)
        odbc = f"DRIVER={{PostgreSQL Unicode}};SERVER=127.0.0.1;PORT=5432;DATABASE={name};UID=postgres;"
    try:
        yield odbc
    finally:
        if engine == "mariadb":
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                drop_mariadb_database(name)
        else:
            _system_psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


def _system_psql(sql: str, *, check: bool) -> None:
    subprocess.run(
        ["psql", "-X", "-q", "-d", SYSTEM_PG, "-c", sql], check=check, capture_output=True, timeout=60
    )


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie has stopped: only its reaping is left)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
