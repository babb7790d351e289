"""What the benchmarks share: a private RabbitMQ vhost and control database, and settings that use them."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import pika

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deskvault.local import seaweedfs  # noqa: E402
from deskvault_core.config import Settings, load_settings  # noqa: E402
from messages.events import BackupDue  # noqa: E402
from producers.publisher import Publisher  # noqa: E402
from workers.context import open_ledger, open_repository  # noqa: E402
from workers.repository.keyring import Keyring  # noqa: E402


def system_psql(sql: str, *, check: bool = True, database: str = "postgres") -> None:
    """SQL on the machine's PostgreSQL, where a benchmark's control database lives."""
    cmd = ["psql", "-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", database, "-c", sql]
    subprocess.run(cmd, check=check, capture_output=True)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def publish_full_backup(settings: Settings, target: str) -> None:
    """A backup-due(kind=full) for now, as the scheduler would publish it."""
    publish_backup(settings, target, "full")


def publish_backup(settings: Settings, target: str, kind: str) -> None:
    """A backup-due of `kind` (full, diff, log) for the current minute, as the scheduler would publish it."""
    slot = datetime.now(UTC).replace(second=0, microsecond=0)
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher.publish(BackupDue.new(target=target, kind=kind, slot=slot))


def drop_caches() -> bool:
    """Before a timed phase: write back everything dirty and, as root, empty the page cache.

    Every tool then reads from disk alike. False if the cache could not be dropped (not root, or a
    container that forbids it): the phase then starts with whatever the cache holds.
    """
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def raw_s3(settings: Settings):
    """A plain boto3 client on the repository's store (sizes, and the stage-alone PUTs and GETs)."""
    import boto3
    from botocore.config import Config

    r = settings.repository
    return boto3.session.Session().client(
        "s3",
        endpoint_url=r.endpoint or None,
        aws_access_key_id=r.access_key or None,
        aws_secret_access_key=r.secret_key or None,
        region_name=r.region,
        verify=r.ca_bundle or None,
        config=Config(
            s3={"addressing_style": "path" if r.endpoint else "auto"},
            max_pool_connections=32,
            retries={"mode": "standard", "max_attempts": 5},
        ),
    )


def deskvault_command(settings: Settings, *args: str, log_level: str = "WARNING") -> list[str]:
    """`deskvault --config <the benchmark's file> ARGS...`, for a process of its own."""
    config = ["--config", str(settings.source), "--log-level", log_level]
    return [sys.executable, "-m", "deskvault.cli", *config, *args]


def backup_worker_command(settings: Settings, *, burst: bool = True) -> list[str]:
    """A real `deskvault worker` for the backup pool; with `burst`, it exits once its queue is empty."""
    command = [
        sys.executable,
        "-m",
        "deskvault.cli",
        "--config",
        str(settings.source),
        "--log-level",
        "WARNING",
        "worker",
        "--pool",
        "backup",
        "--threads",
        "1",
        "--no-metrics",
    ]
    return [*command, "--burst"] if burst else command


def queue_consumers(settings: Settings, queue: str) -> int:
    """How many consumers RabbitMQ counts on a pool's queue (a started worker has one)."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker.url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.consumer_count
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            return 0  # the worker has not declared its queues yet
        raise
    finally:
        connection.close()


class BenchServices:
    """A vhost and a control database of the benchmark's own, removed again on exit."""

    def __init__(self, name: str) -> None:
        self.vhost = f"deskvault-{name}-{uuid.uuid4().hex[:6]}"
        self.control_db = f"dv{name.replace('-', '')}_{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> BenchServices:
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", self.vhost], check=True, capture_output=True)
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
        )
        system_psql(f"CREATE DATABASE {self.control_db}")
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", self.vhost], capture_output=True)
        system_psql(f"DROP DATABASE IF EXISTS {self.control_db} WITH (FORCE)", check=False)

    def settings(
        self,
        scratch: Path,
        *,
        target: str,
        conninfo: str,
        prefix: str,
        extra: str = "",
        s3: seaweedfs.S3Endpoint | None = None,
        ca_bundle: Path | None = None,
        target_extra: str = "",
    ) -> Settings:
        """Settings for these services, SeaweedFS, a new key file and one target; ledger and bucket ready.

        `s3`: the store to use (default: the shared SeaweedFS of .deskvault, started if need be);
        `ca_bundle`: the certificate an HTTPS `s3` presents; `extra` goes into [repository] (or opens
        sections of its own), `target_extra` into the target's.
        """
        s3 = s3 or seaweedfs.ensure_running(ROOT / ".deskvault")
        key_file = scratch / "keys.json"
        Keyring.create(key_file)
        config = scratch / "deskvault.toml"
        config.write_text(f"""
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/{self.vhost}"
[control_db]
odbc = "DRIVER={{PostgreSQL Unicode}};SERVER=127.0.0.1;PORT=5432;DATABASE={self.control_db};UID=postgres;"
[repository]
bucket = "deskvault-bench"
prefix = "{prefix}-{uuid.uuid4().hex[:8]}/"
endpoint = "{s3.endpoint_url}"
access_key = "{s3.access_key}"
secret_key = "{s3.secret_key}"
key_file = "{key_file}"
{f'ca_bundle = "{ca_bundle}"' if ca_bundle else ""}
{extra}
[targets.{target}]
engine = "postgresql"
conninfo = "{conninfo}"
{target_extra}
""")
        settings = load_settings(config, env={})
        open_ledger(settings).migrate()
        open_repository(settings).store.ensure_bucket()
        return settings
