"""A real Prometheus (Debian's package) scrapes a running deskvault: every dashboard query and every alert
expression returns data, and every alert rule evaluates without error.

This is what keeps ops/grafana and ops/prometheus from drifting away from the metrics the code exports:
a renamed metric or label leaves a panel or an alert empty, and this test names it.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from support import (
    deskvault_command,
    free_port,
    prom_query,
    start_deskvault,
    start_prometheus,
    wait_for,
    worker_context,
)

from deskvault.local.demo_data import helpdesk_sql
from deskvault.status import exit_code
from messages.events import AccountExpired, BackupDue, ExportRequested, RestoreDrill
from producers.publisher import Publisher
from workers.engines.postgresql.cluster import PgCluster

pytestmark = pytest.mark.integration

OPS = Path(__file__).resolve().parents[2] / "ops"
DASHBOARD = json.loads((OPS / "grafana" / "dashboards" / "deskvault.json").read_text())
DASHBOARD_QUERIES = {  # with every variable at "All", as Grafana sends them
    f"panel {panel['title']!r} ({target['refId']})": target["expr"]
    .replace("$target", ".*")
    .replace("$pool", ".*")
    for panel in DASHBOARD["panels"]
    if panel["type"] != "row"
    for target in panel["targets"]
}
ALERT_RULES = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
# An alert's expression returns data only while it fires; what must return data is what it compares.
THRESHOLD = re.compile(r"\s*(>|<|==|!=|>=|<=)\s*[0-9*. ]+$")
ALERT_QUERIES = {f"alert {rule['alert']}": THRESHOLD.sub("", rule["expr"].strip()) for rule in ALERT_RULES}


def test_every_alert_expression_ends_in_the_threshold_this_test_strips() -> None:
    for rule in ALERT_RULES:
        assert THRESHOLD.search(rule["expr"].strip()), f"{rule['alert']}: no trailing comparison"


@pytest.fixture(scope="module")
def cluster(scratch_dir: Path) -> Iterator[PgCluster]:
    """A target of its own: the WAL streamer leaves a replication slot behind on it."""
    cluster = PgCluster(scratch_dir / f"live-prom-{uuid.uuid4().hex[:6]}", free_port(), tcp=True)
    cluster.initdb()
    cluster.start()
    cluster.psql("CREATE DATABASE acme")
    cluster.psql(helpdesk_sql("acme"), "acme")
    yield cluster
    cluster.destroy()


def _status(settings, *args: str) -> tuple[int, str]:
    """`deskvault status`'s exit code and output (1 or 2 when something needs attention)."""
    command = deskvault_command(settings, "status", *args)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1, 2), result.stderr
    return result.returncode, result.stdout


def _api(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}", timeout=10) as response:
        return json.load(response)["data"]


def test_a_real_prometheus_gets_data_for_every_dashboard_query_and_alert(
    make_settings, cluster: PgCluster, tmp_path: Path
) -> None:
    tenant = f"t{uuid.uuid4().hex[:10]}"
    cluster.psql(f"CREATE DATABASE {tenant} TEMPLATE acme")  # a tenant's database is its own
    settings = make_settings(
        target=cluster,
        extra=f'[tenants.{tenant}]\nplan = "paid"\ndatabase = "{tenant}"\ntarget = "main"\n',
    )
    ctx = worker_context(settings)
    worker_port, wal_port = free_port(), free_port()
    prometheus, prom_port = start_prometheus(tmp_path, worker_port, wal_port)
    processes = [
        start_deskvault(
            settings, tmp_path / "w.log", "worker", "--threads", "2", "--metrics-port", str(worker_port)
        ),
        start_deskvault(settings, tmp_path / "wal.log", "wal-stream", "--metrics-port", str(wal_port)),
        prometheus,
    ]
    try:
        # Given a deskvault that has done one event of each kind: a full and a log backup, a restore
        # drill, an expiry and an export, with the WAL streaming
        wait_for(
            lambda: cluster.psql("SELECT count(*) FROM pg_stat_replication").strip() == "1",
            timeout=60,
            what="the WAL streamer to connect",
        )
        # (and Prometheus scraping both, so it sees every counter move from its initial zero)
        wait_for(
            lambda: len(prom_query(prom_port, 'up{job=~"deskvault.*"} == 1')) == 2,
            timeout=60,
            what=f"Prometheus to scrape deskvault (see {tmp_path / 'prometheus.log'})",
        )
        now = datetime.now(UTC).replace(microsecond=0)
        unique = uuid.uuid4().hex  # the control database is shared by the session: no slot-based keys
        events = [
            BackupDue.new(target="main", kind="full", slot=now, idempotency_key=f"live-full-{unique}"),
            BackupDue.new(target="main", kind="log", slot=now, idempotency_key=f"live-log-{unique}"),
            RestoreDrill.new(target="main", slot=now, idempotency_key=f"live-drill-{unique}"),
            AccountExpired.new(tenant=tenant, plan="paid", expired_at=now - timedelta(days=1)),
            ExportRequested.new(tenant=tenant, request_id=uuid.uuid4().hex, requested_by="ops@example.com"),
        ]
        with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
            for event in events:
                publisher.publish(event)
                # One at a time: the log backup and the drill need the full before them.
                wait_for(
                    lambda e=event: (job := ctx.ledger.job(e.idempotency_key)) and job.state == "done",
                    timeout=180,
                    what=f"{event.type} to be done (see {tmp_path}/w.log)",
                )
        cluster.psql("SELECT pg_switch_wal()")

        # When Prometheus has scraped for a while
        def without_data() -> list[str]:
            queries = {**DASHBOARD_QUERIES, **ALERT_QUERIES}
            return [f"{name}: {expr}" for name, expr in queries.items() if not prom_query(prom_port, expr)]

        deadline = time.monotonic() + 90
        while (empty := without_data()) and time.monotonic() < deadline:
            time.sleep(2)
        # Then every dashboard query and every alert expression returns data
        assert empty == [], "no data for:\n" + "\n".join(empty)

        # Then every alert rule was evaluated without error, and none fires on a healthy deskvault
        rules = [r for g in _api(prom_port, "rules")["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == {rule["alert"] for rule in ALERT_RULES}
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        alerts = _api(prom_port, "alerts")["alerts"]
        firing = [a["labels"]["alertname"] for a in alerts if a["state"] == "firing"]
        assert firing == [], firing
        # And both deskvault jobs are up
        up = {r["metric"]["job"]: r["value"][1] for r in prom_query(prom_port, 'up{job=~"deskvault.*"}')}
        assert up == {"deskvault-workers": "1", "deskvault-wal-stream": "1"}

        # And `deskvault status` shows the same picture, with waits read from this Prometheus
        code, status = _status(settings, "--json", "--prometheus", f"http://127.0.0.1:{prom_port}")
        main = json.loads(status)["targets"]["main"]
        assert main["rpo_seconds"] is not None and main["rpo_seconds"] < 60
        assert all(main["newest"][kind] for kind in ("full", "log"))
        assert main["drill"]["passed"] is True
        pools = json.loads(status)["pools"]
        assert pools["backup"]["consumers"] == 1 and pools["backup"]["ready"] == 0
        assert pools["backup"]["wait_p99_seconds"] is not None and pools["backup"]["failures_1h"] == 0
        assert json.loads(status)["warnings"] == []
        # (its exit code says whether anything needs attention: on this healthy target nothing does, while
        # the session's shared ledger and broker may hold other tests' failed jobs and dead letters)
        attention = json.loads(status)["attention"]
        assert code == exit_code(json.loads(status)), attention
        assert not [a for a in attention if a["what"].startswith("main:")], attention
        text_code, text = _status(settings, "--prometheus", f"http://127.0.0.1:{prom_port}")
        assert text_code == code
        assert "passed" in text.splitlines()[3] and text.splitlines()[3].startswith("main ")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
