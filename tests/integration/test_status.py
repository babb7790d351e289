"""`deskvault status` against the real services, and when they are out of reach."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from support import worker_context

from deskvault.status import collect_status, render_status
from messages.topology import POOLS
from producers.publisher import Publisher

pytestmark = pytest.mark.integration


def test_status_reads_queues_and_the_ledger_and_renders_a_table(make_settings) -> None:
    settings = make_settings()
    worker_context(settings)
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher._open()  # declares the topology

    status = collect_status(settings)

    assert set(status["pools"]) == set(POOLS)
    assert all(p["ready"] is not None and p["dead_letters"] is not None for p in status["pools"].values())
    assert status["targets"]["main"]["rpo_seconds"] is None  # no WAL streamer answers in this test
    assert status["warnings"] == []
    text = render_status(status)
    assert text.splitlines()[2].split() == ["TARGET", "RPO", "FULL", "DIFF", "LOG", "RESTORE", "DRILL"]
    newest_drill = worker_context(settings).ledger.newest_drills().get("main")
    expected = "never run" if newest_drill is None else ("passed" if newest_drill["succeeded"] else "FAILED")
    assert any(line.startswith("main ") and expected in line for line in text.splitlines())
    assert all(any(line.startswith(f"{pool} ") for line in text.splitlines()) for pool in POOLS)


def test_status_says_what_it_could_not_read_and_still_answers(make_settings) -> None:
    settings = make_settings()
    settings = replace(settings, broker=replace(settings.broker, url="amqp://guest:guest@127.0.0.1:1/"))
    worker_context(settings)

    status = collect_status(settings, prometheus_url="http://127.0.0.1:1")

    assert any(w.startswith("RabbitMQ unreachable") for w in status["warnings"])
    assert any("Prometheus at http://127.0.0.1:1 could not be queried" in w for w in status["warnings"])
    assert all(p["ready"] is None for p in status["pools"].values())
    assert "WARNING: RabbitMQ unreachable" in render_status(status)


def test_status_json_from_the_cli_parses(make_settings) -> None:
    settings = make_settings()
    worker_context(settings)
    result = subprocess.run(
        [sys.executable, "-m", "deskvault.cli", "--config", str(settings.source), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    status = json.loads(result.stdout)
    assert set(status) == {"at", "targets", "pools", "purges", "warnings", "attention"}
    # no WAL streamer answers here: the RPO is unknown, which is worth a look but no failure
    assert {"level": "WARN", "what": "main: the live RPO is unknown: no `deskvault wal-stream` answers"} in (
        status["attention"]
    )
    assert result.returncode == (2 if any(a["level"] == "FAIL" for a in status["attention"]) else 1)


def test_status_exits_2_when_the_newest_drill_failed(make_settings) -> None:
    settings = make_settings()
    ledger = worker_context(settings).ledger
    ledger.record_drill(
        target="main",
        drill_id=uuid.uuid4().hex,
        point_in_time=datetime.now(UTC),
        succeeded=False,
        duration_seconds=3,
        detail="restored cluster did not start",
    )

    result = subprocess.run(
        [sys.executable, "-m", "deskvault.cli", "--config", str(settings.source), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2, result.stdout + result.stderr
    assert "FAILED" in result.stdout
    assert "FAIL: main: the newest restore drill failed; run `deskvault backups verify --target main`" in (
        result.stdout
    )
