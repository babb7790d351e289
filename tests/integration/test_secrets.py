"""With every credential configured, no secret appears in any log line, error message, dead-letter reason,
`--help`, status output or metric: this test collects all of them from real runs and greps."""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import build_settings, deskvault_command, free_port, wait_for, worker_context

from deskvault.cli import _parser
from messages.events import AccountExpired, BackupDue, ExportRequested
from messages.topology import POOLS, dead_letter_queue, delay_queue
from producers.publisher import Publisher

pytestmark = pytest.mark.integration


@pytest.fixture
def secret_broker_user(rabbit_url: str) -> Iterator[tuple[str, str]]:
    """A RabbitMQ user of the test vhost whose password is a secret to look for."""
    user, password = f"dv-{uuid.uuid4().hex[:8]}", f"brokerpw{uuid.uuid4().hex}"
    vhost = urlparse(rabbit_url).path.lstrip("/")
    for command in (["add_user", user, password], ["set_permissions", "-p", vhost, user, ".*", ".*", ".*"]):
        subprocess.run(["rabbitmqctl", "-q", *command], check=True, capture_output=True, timeout=60)
    parsed = urlparse(rabbit_url)
    yield f"amqp://{user}:{password}@{parsed.hostname}:{parsed.port}/{vhost}", password
    subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=60)


def _help_texts(parser: argparse.ArgumentParser) -> Iterator[str]:
    yield parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _help_texts(sub)


def test_no_secret_reaches_logs_errors_help_status_or_metrics(
    tmp_path: Path, key_file: Path, s3_endpoint, control_db_odbc: str, pg_target, secret_broker_user
) -> None:
    broker_url, broker_password = secret_broker_user
    secrets = {
        "broker password": broker_password,
        "control database password": f"dbpw{uuid.uuid4().hex}",
        "target password": f"targetpw{uuid.uuid4().hex}",
        "unreachable target password": f"downpw{uuid.uuid4().hex}",
        "accounts database password": f"accountspw{uuid.uuid4().hex}",
        "download link secret": f"linksecret{uuid.uuid4().hex}",
        "S3 secret key": s3_endpoint.secret_key,
    }
    for key_id, encoded in json.loads(key_file.read_text())["keys"].items():
        secrets[f"key-encryption key {key_id} (base64)"] = encoded
        secrets[f"key-encryption key {key_id} (hex)"] = base64.b64decode(encoded).hex()
    # Trust authentication ignores these passwords, so every component still works with them set.
    extra = f"""
[targets.down]
engine = "postgresql"
conninfo = "host=127.0.0.1 port=1 user=postgres password={secrets["unreachable target password"]}"
[lifecycle]
accounts_odbc = "{control_db_odbc}PWD={secrets["accounts database password"]};"
accounts_query = "SELECT id, plan, downloadable_backups, database_name, target FROM no_such_accounts_table"
[downloads]
link_secret = "{secrets["download link secret"]}"
"""
    settings = build_settings(
        tmp_path,
        key_file,
        s3_endpoint,
        broker_url,
        f"{control_db_odbc}PWD={secrets['control database password']};",
        SimpleNamespace(
            conninfo=f"{pg_target.conninfo} password={secrets['target password']}", datadir=pg_target.datadir
        ),
        extra=extra,
    )
    worker_context(settings)
    _empty_queues(settings.broker.url)  # other tests' leftovers in the session's vhost would muddle dlq list
    outputs: dict[str, str] = {}
    base = deskvault_command(settings)

    def run(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*base, *args], capture_output=True, text=True, timeout=timeout)
        outputs[name] = result.stdout + result.stderr
        return result

    # --help of every command
    outputs["--help"] = "\n".join(_help_texts(_parser()))
    # Events that succeed, fail and are refused, through a worker logging at DEBUG, with metrics served
    slot = datetime.now(UTC).replace(microsecond=0)
    events = [
        BackupDue.new(target="main", kind="full", slot=slot, idempotency_key=f"sec-{uuid.uuid4().hex}"),
        BackupDue.new(target="down", kind="full", slot=slot, idempotency_key=f"sec-{uuid.uuid4().hex}"),
        ExportRequested.new(tenant="acme", request_id=uuid.uuid4().hex, requested_by="ops@example.com"),
        AccountExpired.new(tenant="no-such-tenant", plan="paid", expired_at=slot),
    ]
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        for event in events:
            publisher.publish(event)
    port = free_port()
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [*base, "--log-level", "DEBUG", "worker", "--threads", "2", "--metrics-port", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        # (every event handled or dead-lettered, after its retries)
        outputs["metrics"] = wait_for(
            lambda: _finished_metrics(port, len(events)),
            timeout=180,
            what=f"the events to be done (see {log})",
        )
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    outputs["worker log (DEBUG)"] = log.read_text()
    ledger = worker_context(settings).ledger
    assert ledger.job(events[0].idempotency_key).state == "done"  # the secrets were in real use
    # CLI commands an operator runs, including ones that fail
    run("status", "status")
    run("status --json", "status", "--json")
    run("tenants list (accounts query fails)", "tenants", "list")
    run("dlq list", "dlq", "list", "--pool", "backup")
    run("dlq list lifecycle", "dlq", "list", "--pool", "lifecycle")
    run("backups list of the unreachable target", "backups", "list", "--target", "down")
    run("publish with a bad field", "publish", "backup-due", "--target", "main", "--kind", "weekly")
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text(Path(settings.source).read_text().replace("max_retries = 2", 'max_retries = "two"'))
    outputs["a bad config file"] = subprocess.run(
        [sys.executable, "-m", "deskvault.cli", "--config", str(bad_config), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stderr

    assert "down" in outputs["dlq list"] and "Connection refused" in outputs["dlq list"]  # reasons are there
    leaks = [
        f"{what} in {where}"
        for what, secret in secrets.items()
        for where, text in outputs.items()
        if secret in text
    ]
    assert leaks == []


def _finished_metrics(port: int, expected: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    done = sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in ("deskvault_events_handled_total", "deskvault_events_dead_lettered_total")
    )
    return text if done >= expected else None


def _empty_queues(url: str) -> None:
    with Publisher(url, delivery_limit=5) as publisher:
        channel = publisher._open()  # declares the topology
        for pool in POOLS:
            for queue in (pool, delay_queue(pool), dead_letter_queue(pool)):
                channel.queue_purge(queue)
