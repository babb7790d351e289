"""The README's run command, tried as a newcomer would: `deskvault up` takes the first full backup and
passes the first restore drill unasked."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from support import free_port, rabbit_vhost, scratch_database, wait_for

from workers.engines.postgresql.cluster import PgCluster

pytestmark = pytest.mark.integration

REPO_STATE = Path(__file__).resolve().parents[2] / ".deskvault"


@pytest.fixture
def own_broker_and_ledger() -> Iterator[tuple[str, str]]:
    """A vhost and a control database of up's alone: the dead letters and failed jobs it must not have
    are counted there, where no other test leaves its own (and none of up's is left for the next)."""
    with rabbit_vhost("deskvault-up") as url, scratch_database() as odbc:
        yield url, odbc


def test_up_brings_everything_up_and_backs_up_the_demo_target(
    scratch_dir: Path, s3_endpoint, own_broker_and_ledger: tuple[str, str]
) -> None:
    # Given a fresh state folder that shares the session's SeaweedFS (same credentials, same port)
    rabbit_url, control_db_odbc = own_broker_and_ledger
    state = scratch_dir / "up-state"
    (state / "seaweedfs").mkdir(parents=True)
    shutil.copy(REPO_STATE / "seaweedfs" / "s3.json", state / "seaweedfs" / "s3.json")
    demo_port, metrics_port = free_port(), random.randrange(20000, 30000, 10)
    env = {
        **os.environ,
        "DESKVAULT_BROKER__URL": rabbit_url,
        "DESKVAULT_CONTROL_DB__ODBC": control_db_odbc,
        "DESKVAULT_REPOSITORY__PREFIX": f"up-{uuid.uuid4().hex[:8]}/",
    }
    log = (scratch_dir / "up.log").open("w")
    started = time.monotonic()
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deskvault.cli",
            "up",
            "--state-dir",
            str(state),
            "--demo-port",
            str(demo_port),
            "--metrics-port",
            str(metrics_port),
            "--s3-port",
            str(urlparse(s3_endpoint.endpoint_url).port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    config = state / "deskvault.toml"
    try:
        # When nothing else is done, then a full backup of the demo target appears in `backups list --json`
        def listed_full():
            if up.poll() is not None:
                raise AssertionError(f"deskvault up exited early:\n{_tail(scratch_dir / 'up.log')}")
            if not config.exists():
                return None
            listing = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "deskvault.cli",
                    "--config",
                    str(config),
                    "backups",
                    "list",
                    "--target",
                    "demo",
                    "--json",
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            if listing.returncode != 0:
                return None
            fulls = [b for b in json.loads(listing.stdout)["backups"] if b["kind"] == "full"]
            return fulls or None

        fulls = wait_for(listed_full, timeout=180, what="the first full backup of the demo target")
        assert fulls[0]["target"] == "demo" and fulls[0]["stop_lsn"]

        # and the demo tenants are known, each on the demo target
        tenants = subprocess.run(
            [sys.executable, "-m", "deskvault.cli", "--config", str(config), "tenants", "list", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert tenants.returncode == 0, tenants.stderr
        assert {(t["tenant"], t["target"]) for t in json.loads(tenants.stdout)} == {
            ("acme", "demo"),
            ("globex", "demo"),
            ("initech", "demo"),
        }

        # and the backup pool's metrics count it
        def handled() -> float:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            line = next(
                (
                    x
                    for x in text.splitlines()
                    if x.startswith('deskvault_events_handled_total{pool="backup",type="backup-due"}')
                ),
                None,
            )
            return float(line.split()[-1]) if line else 0.0

        assert wait_for(handled, timeout=30, what="backup-due counted as handled") >= 1

        # and the first restore drill, due at once like the first full, passes: it waits for that full
        # rather than failing on an empty repository, and restores a moment the archive really reaches
        def drilled():
            if up.poll() is not None:
                raise AssertionError(f"deskvault up exited early:\n{_tail(scratch_dir / 'up.log')}")
            time.sleep(2)  # each probe is a whole CLI process; the drill needs the cores
            status = subprocess.run(
                [sys.executable, "-m", "deskvault.cli", "--config", str(config), "status", "--json"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            assert status.returncode in (0, 1, 2) and status.stdout, status.stderr  # 1, 2: attention
            return json.loads(status.stdout)["targets"]["demo"]["drill"]

        drill = wait_for(drilled, timeout=300, what="the first restore drill of the demo target")
        assert drill["passed"], f"the first drill failed:\n{_tail(scratch_dir / 'up.log')}"
        assert "Failed to process message restore_drill" not in (scratch_dir / "up.log").read_text()

        # and once the first minute is over, nothing waits in a dead-letter queue and no job failed:
        # the first differential and drill, due before any full exists, wait for it instead
        time.sleep(max(0.0, started + 60 - time.monotonic()))
        status = subprocess.run(
            [sys.executable, "-m", "deskvault.cli", "--config", str(config), "status", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        report = json.loads(status.stdout)
        pools = report["pools"]

        def dead_letters(pool: str) -> str:
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "deskvault.cli",
                    "--config",
                    str(config),
                    "dlq",
                    "list",
                    "--pool",
                    pool,
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            ).stdout

        dead = {pool: dead_letters(pool) for pool, p in pools.items() if p["dead_letters"]}
        assert not dead, dead
        assert all(p["failed_24h"] == 0 for p in pools.values()), (pools, _tail(scratch_dir / "up.log"))
        assert not [a for a in report["attention"] if a["level"] == "FAIL"], report["attention"]

        # and the scheduler says it is alive where a service manager would ask
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port - 2}/healthz", timeout=10) as health:
            assert health.status == 200 and health.read().startswith(b"last tick finished")

        # and Ctrl-C stops everything, cleanly and within 10 seconds
        up.send_signal(signal.SIGINT)
        stopping = time.monotonic()
        assert up.wait(timeout=30) == 0, _tail(scratch_dir / "up.log")
        assert time.monotonic() - stopping < 10, _tail(scratch_dir / "up.log")
    finally:
        if up.poll() is None:
            up.kill()
        PgCluster(state / "demo-pg", demo_port, tcp=True).stop("immediate")
        log.close()


def _tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-40:])
