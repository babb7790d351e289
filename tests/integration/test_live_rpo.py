"""The live RPO tells the truth: `deskvault_wal_archived_timestamp_seconds` moves only when an upload round
has confirmed that the receiver holds everything the server had flushed, so a receiver that fails right
after every start makes DeskvaultRPOHigh fire in a real Prometheus, and `deskvault status` says why."""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support import (
    free_port,
    prom_query,
    run_cli,
    start_deskvault,
    start_prometheus,
    wait_for,
    worker_context,
)

from workers.engines.postgresql.cluster import PgCluster
from workers.engines.postgresql.walstream import slot_name

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

FIRING = 'ALERTS{alertname="DeskvaultRPOHigh", alertstate="firing", target="main"}'
# The rule as shipped, with its `for:` shortened from 2 minutes so the test does not wait for it.
ALERT_FOR = {"DeskvaultRPOHigh": "15s"}
# A segment far beyond anything the server has written: pg_receivewal resumes from the newest segment
# in its folder, so the server refuses it ("requested starting point ... is ahead of the WAL flush
# position") after every start -- as when a target is rebuilt from an older copy under the same spool.
FUTURE_SEGMENT = "0000000100000000000000F0.partial"


@pytest.fixture
def cluster(scratch_dir: Path) -> Iterator[PgCluster]:
    cluster = PgCluster(scratch_dir / f"rpo-{uuid.uuid4().hex[:6]}", free_port(), tcp=True)
    cluster.initdb()
    cluster.start()
    cluster.psql("CREATE TABLE beat (id serial PRIMARY KEY, at timestamptz DEFAULT now())")
    yield cluster
    cluster.destroy()


def _keep_writing(cluster: PgCluster, stop: threading.Event) -> None:
    """A helpdesk database is never idle: a commit every half second."""
    while not stop.wait(0.5):
        cluster.psql("INSERT INTO beat DEFAULT VALUES")


def _rpo_seconds(prom_port: int) -> float | None:
    result = prom_query(prom_port, "time() - deskvault_wal_archived_timestamp_seconds")
    return float(result[0]["value"][1]) if result else None


def test_the_rpo_alert_fires_while_the_receiver_fails_after_every_start_and_recovers_when_fixed(
    make_settings, cluster: PgCluster, tmp_path: Path
) -> None:
    settings = make_settings(target=cluster)
    worker_context(settings)  # the control database's tables, which `deskvault status` reads
    wal_port = free_port()
    prometheus, prom_port = start_prometheus(tmp_path, free_port(), wal_port, rules_for=ALERT_FOR)
    streamer = start_deskvault(settings, tmp_path / "wal.log", "wal-stream", "--metrics-port", str(wal_port))
    stop = threading.Event()
    writer = threading.Thread(target=_keep_writing, args=(cluster, stop), daemon=True)
    writer.start()
    spool = Path(settings.wal.spool_dir) / "main"
    try:
        # Given the WAL streaming, with Prometheus seeing an RPO of seconds
        wait_for(
            lambda: (rpo := _rpo_seconds(prom_port)) is not None and rpo < 15,
            timeout=90,
            what=f"a fresh live RPO in Prometheus (see {tmp_path})",
        )
        # When the receiver fails right after every start
        with (spool / FUTURE_SEGMENT).open("wb") as f:
            f.truncate(16 * 1024 * 1024)
        cluster.psql(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            f"WHERE slot_name = '{slot_name('main')}'"
        )
        # Then the alert fires in Prometheus, the rule's expression past 60 s for its `for:`
        wait_for(
            lambda: prom_query(prom_port, FIRING),
            timeout=150,
            what=f"DeskvaultRPOHigh to fire (see {tmp_path / 'wal.log'})",
        )
        # with an absolute runbook link, built from the base prometheus.yml configures
        with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/alerts", timeout=10) as response:
            alerts = json.load(response)["data"]["alerts"]
        rpo_alert = next(a for a in alerts if a["labels"]["alertname"] == "DeskvaultRPOHigh")
        base = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())["global"][
            "external_labels"
        ]["runbook_base"]
        assert rpo_alert["annotations"]["runbook_url"] == f"{base}/alerts.md#deskvaultrpohigh"
        assert (ROOT / "ops" / "runbooks" / "alerts.md").read_text().count("## DeskvaultRPOHigh") == 1
        # And `deskvault status` shows the RPO and why the WAL is not safe
        status = run_cli(settings, "status", "--prometheus", f"http://127.0.0.1:{prom_port}")
        assert "ahead of the WAL flush position" in status.stdout, status.stdout + status.stderr
        assert "pg_receivewal" in status.stdout, status.stdout
        # When the receiver is fixed (the stray segment taken away), then the RPO recovers
        (spool / FUTURE_SEGMENT).unlink()
        wait_for(
            lambda: not prom_query(prom_port, FIRING) and (_rpo_seconds(prom_port) or 999) < 15,
            timeout=150,
            what=f"the live RPO to recover (see {tmp_path / 'wal.log'})",
        )
        status = run_cli(settings, "status", "--prometheus", f"http://127.0.0.1:{prom_port}")
        assert "ahead of the WAL flush position" not in status.stdout, status.stdout
    finally:
        stop.set()
        writer.join(timeout=10)
        for process in (streamer, prometheus):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
