"""`deskvault up`: the whole system on one machine, on local defaults.

Starts what is missing (SeaweedFS, a demo PostgreSQL cluster with a few tenants' helpdesk databases),
writes a config for it, then runs the scheduler and all four pools until Ctrl-C. The scheduler emits the
newest due slot of every backup kind at once, so the demo target's first full backup is taken right away.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from deskvault.local import seaweedfs
from deskvault.local.demo_data import helpdesk_sql
from deskvault_core import lifeline
from deskvault_core.config import load_settings
from deskvault_core.errors import DeskvaultError
from messages.topology import POOLS
from workers.context import open_ledger, open_repository
from workers.engines.postgresql.cluster import PgCluster
from workers.repository.keyring import Keyring

log = logging.getLogger(__name__)

DEMO_TARGET = "demo"
DEMO_TENANTS = ("acme", "globex", "initech")
DEMO_PLANS = ("company", "team", "trial")
CONTROL_DB = "deskvault"
SYSTEM_PG = "host=127.0.0.1 port=5432 user=postgres"


@dataclass(frozen=True)
class UpOptions:
    state_dir: Path
    demo_port: int = 55432
    s3_port: int = 8333
    metrics_port: int = 9310
    log_level: str = "INFO"


def run_up(options: UpOptions) -> int:
    state = options.state_dir
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o755)  # the postgres user must reach the demo cluster inside it
    _step("starting SeaweedFS (S3) on 127.0.0.1:%d", options.s3_port)
    s3 = seaweedfs.ensure_running(state, s3_port=options.s3_port)
    key_file = state / "keys.json"
    if not key_file.exists():
        Keyring.create(key_file)
        _step("created key file %s -- keep a copy: without it no backup can be read", key_file)
    _ensure_control_db()
    cluster = PgCluster(state / "demo-pg", options.demo_port, tcp=True)
    _ensure_demo_cluster(cluster)
    config = _write_config(state, options, s3, key_file, cluster)
    settings = load_settings(config)
    open_repository(settings).store.ensure_bucket()
    open_ledger(settings).migrate()
    _step("config: %s (other commands read it from ./.deskvault, or pass --config)", config)
    return _run_processes(config, settings, options, cluster)


def _step(message: str, *args: object) -> None:
    log.info("up: " + message, *args)


def _ensure_control_db() -> None:
    probe = subprocess.run(
        [
            "psql",
            "-X",
            "-At",
            "-d",
            SYSTEM_PG,
            "-c",
            f"SELECT 1 FROM pg_database WHERE datname = '{CONTROL_DB}'",
        ],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        raise DeskvaultError(
            f"cannot reach PostgreSQL on 127.0.0.1:5432 for the control database: "
            f"{probe.stderr.strip()[:300]}; start it (see README)"
        )
    if probe.stdout.strip() != "1":
        subprocess.run(
            ["psql", "-X", "-q", "-d", SYSTEM_PG, "-c", f"CREATE DATABASE {CONTROL_DB}"],
            check=True,
            capture_output=True,
        )
        _step("created control database %s on 127.0.0.1:5432", CONTROL_DB)


def _ensure_demo_cluster(cluster: PgCluster) -> None:
    if not (cluster.datadir / "PG_VERSION").exists():
        _step("creating the demo PostgreSQL cluster in %s", cluster.datadir)
        cluster.initdb()
    cluster.start()
    existing = set(cluster.psql("SELECT datname FROM pg_database").split())
    for tenant in DEMO_TENANTS:
        if tenant not in existing:
            cluster.psql(f"CREATE DATABASE {tenant}")
            cluster.psql(helpdesk_sql(tenant, scale=2), tenant)
            _step("demo tenant %s: helpdesk database created with tickets, replies, users, articles", tenant)
    _step("demo target %r: PostgreSQL on 127.0.0.1:%d (%s)", DEMO_TARGET, cluster.port, cluster.datadir)


def _write_config(
    state: Path, options: UpOptions, s3: seaweedfs.S3Endpoint, key_file: Path, cluster: PgCluster
) -> Path:
    config = state / "deskvault.toml"
    text = f"""# Written by `deskvault up` for local use; see deskvault.example.toml for every key.
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2F"

[control_db]
odbc = "DRIVER={{PostgreSQL Unicode}};SERVER=127.0.0.1;PORT=5432;DATABASE={CONTROL_DB};UID=postgres;"

[repository]
bucket = "deskvault"
endpoint = "{s3.endpoint_url}"
region = "{s3.region}"
access_key = "{s3.access_key}"
secret_key = "{s3.secret_key}"
key_file = "{key_file}"

[metrics]
port = {options.metrics_port}

[wal]
spool_dir = "{state / "wal-spool"}"

[targets.{DEMO_TARGET}]
engine = "postgresql"
conninfo = "{cluster.conninfo}"
data_directory = "{cluster.datadir}"
"""
    # The demo's tenants, each with its helpdesk database on the demo target; a real deployment reads
    # them from the SaaS's accounts table (lifecycle.accounts_odbc).
    for tenant, plan in zip(DEMO_TENANTS, DEMO_PLANS, strict=True):
        text += (
            f'\n[tenants.{tenant}]\nplan = "{plan}"\ndatabase = "{tenant}"\ntarget = "{DEMO_TARGET}"\n'
            f"downloadable_backups = {'true' if plan == 'company' else 'false'}\n"
        )
    config.touch(mode=0o600)
    config.write_text(text)
    return config


def _run_processes(config: Path, settings: object, options: UpOptions, cluster: PgCluster) -> int:
    base = [sys.executable, "-m", "deskvault.cli", "--config", str(config), "--log-level", options.log_level]
    # The WAL streamer's live-RPO metric goes on the port just below the pools' ones (9309 by default).
    wal_stream = [*base, "wal-stream", "--metrics-port", str(options.metrics_port - 1)]
    children = lifeline.env_for_children()  # each stops with up, even if up is killed outright
    procs = {"wal streamer": subprocess.Popen(wal_stream, env=children)}
    try:
        # WAL streaming must run before the first full backup, or the archive would start after it.
        _wait_streaming(cluster, procs["wal streamer"])
    except BaseException:
        procs["wal streamer"].terminate()
        raise
    # The scheduler's /healthz two below the pools' first port (9308 by default).
    commands = {"scheduler": [*base, "scheduler", "--metrics-port", str(options.metrics_port - 2)]}
    for i, pool in enumerate(POOLS):
        commands[f"{pool} pool"] = [
            *base,
            "worker",
            "--pool",
            pool,
            "--threads",
            "2",
            "--metrics-port",
            str(options.metrics_port + i),
        ]
    procs.update({name: subprocess.Popen(cmd, env=children) for name, cmd in commands.items()})
    for i, pool in enumerate(POOLS):
        _step("%s pool running; metrics on http://127.0.0.1:%d/metrics", pool, options.metrics_port + i)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=_announce_first_backup, args=(settings, stop), daemon=True).start()
    _step("scheduler running; its health on http://127.0.0.1:%d/healthz", options.metrics_port - 2)
    _step("running; Ctrl-C stops everything")
    exit_code = 0
    while not stop.wait(1.0):
        dead = [name for name, p in procs.items() if p.poll() is not None]
        if dead:
            log.error(
                "up: %s exited unexpectedly (code %s); stopping everything",
                dead[0],
                procs[dead[0]].returncode,
            )
            exit_code = 1
            break
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 45
    for name, p in procs.items():
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("up: %s did not stop in time; killing it", name)
            p.kill()
    _step("stopped (SeaweedFS and the demo cluster keep running; `deskvault up` reuses them)")
    return exit_code


def _wait_streaming(cluster: PgCluster, streamer: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while cluster.psql("SELECT count(*) FROM pg_stat_replication").strip() == "0":
        if streamer.poll() is not None or time.monotonic() > deadline:
            raise DeskvaultError("the WAL streamer did not connect to the demo target; see its log above")
        time.sleep(0.5)
    _step("WAL of %r streams into the repository", DEMO_TARGET)


def _announce_first_backup(settings: object, stop: threading.Event) -> None:
    ledger = open_ledger(settings)  # type: ignore[arg-type]
    while not stop.wait(2.0):
        try:
            newest = ledger.newest_backup_time(DEMO_TARGET, "full")
        except DeskvaultError:
            continue
        if newest is not None:
            _step(
                "newest full backup of %r finished at %s; see `deskvault backups list --target %s`",
                DEMO_TARGET,
                newest.isoformat(),
                DEMO_TARGET,
            )
            return
