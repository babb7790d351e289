"""`deskvault init` and `deskvault check` against the real services: init creates what is missing and,
run again, nothing; check gives each provoked failure its line, its fix and the right exit code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import free_port, rabbit_vhost, wal_streaming, worker_context

from deskvault.check import run_checks
from deskvault.init import run_init
from deskvault_core.checks import FAIL, OK, WARN, Check, exit_code
from deskvault_core.config import Settings
from messages.topology import POOLS
from workers.engines.postgresql.cluster import PgCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_target(scratch_dir: Path) -> Iterator[PgCluster]:
    """A target of these tests alone: init leaves its replication slot there."""
    cluster = PgCluster(scratch_dir / f"init-target-{uuid.uuid4().hex[:6]}", free_port(), tcp=True)
    cluster.initdb()
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def own_vhost() -> Iterator[str]:
    """A RabbitMQ vhost with no queues yet."""
    with rabbit_vhost("deskvault-init") as url:
        yield url


def _fresh(settings: Settings, tmp_path: Path, broker_url: str) -> Settings:
    """Nothing made yet: a new key file path, a new bucket, a new vhost."""
    repository = replace(
        settings.repository,
        key_file=str(tmp_path / "new-keys.json"),
        bucket=f"dv-init-{uuid.uuid4().hex[:10]}",
    )
    return replace(settings, repository=repository, broker=replace(settings.broker, url=broker_url))


def _by_what(checks: list[Check]) -> dict[str, Check]:
    return {c.what: c for c in checks}


def test_init_creates_what_is_missing_and_run_again_changes_nothing(
    make_settings, own_target: PgCluster, own_vhost: str, tmp_path: Path
) -> None:
    settings = _fresh(make_settings(target=own_target), tmp_path, own_vhost)
    own_target.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")

    planned: list[str] = []
    run_init(settings, dry_run=True, say=planned.append)
    assert planned[0].startswith("would create key file") and planned[1].startswith("would create bucket")
    assert planned[3].startswith(f"would declare {3 * len(POOLS)} queue(s)")
    assert planned[4] == "target main: would create replication slot deskvault_main"
    assert not Path(settings.repository.key_file).exists()  # a dry run changes nothing
    assert own_target.psql("SELECT count(*) FROM pg_replication_slots").strip() == "0"

    first: list[str] = []
    run_init(settings, dry_run=False, say=first.append)
    assert first[0].startswith(f"created key file {settings.repository.key_file} (mode 0600")
    assert Path(settings.repository.key_file).stat().st_mode & 0o777 == 0o600
    assert first[1] == f"created bucket {settings.repository.bucket}"
    assert first[3] == f"declared {3 * len(POOLS)} queue(s) for the pools"
    assert first[4] == "target main: created replication slot deskvault_main"
    # the slot holds no WAL until a streamer first connects: an idle one cannot fill the server's disk
    assert (
        own_target.psql(
            "SELECT restart_lsn IS NULL FROM pg_replication_slots WHERE slot_name = 'deskvault_main'"
        ).strip()
        == "t"
    )

    second: list[str] = []
    run_init(settings, dry_run=False, say=second.append)
    assert second[0].startswith(f"key file {settings.repository.key_file} exists")
    assert second[1:] == [
        f"bucket {settings.repository.bucket} exists",
        second[2],
        "every pool's queues are declared",
        "target main: replication slot deskvault_main exists",
    ]
    assert second[2].startswith("control database at schema version")

    checks = _by_what(run_checks(settings))
    for what in ("broker", "key file", "bucket", "control database", "target main: wal_level"):
        assert checks[what].level == OK, checks[what]
    # init made the slot, but nothing streams into it yet
    assert checks["target main: replication slot"].level == FAIL
    assert "start `deskvault wal-stream`" in checks["target main: replication slot"].fix


def test_init_refuses_a_key_file_others_may_read(make_settings, tmp_path: Path) -> None:
    settings = make_settings()
    Path(settings.repository.key_file).chmod(0o644)
    with pytest.raises(Exception, match="mode 0644"):
        run_init(settings, dry_run=True, say=lambda _: None)


def test_check_fails_each_broken_service_with_its_fix(make_settings, tmp_path: Path) -> None:
    settings = make_settings()
    worker_context(settings)  # the control database migrated
    broken = replace(
        settings,
        broker=replace(settings.broker, url="amqp://guest:secret-pass@127.0.0.1:1/"),
        repository=replace(settings.repository, bucket=f"dv-none-{uuid.uuid4().hex[:8]}"),
    )
    Path(settings.repository.key_file).chmod(0o644)

    checks = _by_what(run_checks(broken))
    no_db = replace(
        settings,
        control_db=replace(settings.control_db, odbc=settings.control_db.odbc.replace("PORT=5432", "PORT=1")),
    )
    control = _by_what(run_checks(no_db))["control database"]
    assert control.level == FAIL and "cannot connect to the control database" in control.detail

    assert checks["broker"].level == FAIL and "127.0.0.1:1 unreachable" in checks["broker"].detail
    assert "secret-pass" not in checks["broker"].line()
    assert checks["bucket"].level == FAIL and checks["bucket"].fix == "run `deskvault init`"
    assert checks["key file"].level == FAIL and "mode 0644" in checks["key file"].detail
    assert f"chmod 600 {settings.repository.key_file}" in checks["key file"].detail
    assert checks["control database"].level == OK
    assert exit_code(checks.values()) == 2


def test_check_a_target_with_wal_level_minimal(make_settings, scratch_dir: Path) -> None:
    cluster = PgCluster(scratch_dir / f"minimal-{uuid.uuid4().hex[:6]}", free_port(), tcp=True)
    cluster.initdb(extra_conf="wal_level = minimal\nmax_wal_senders = 0\n")
    cluster.start()
    try:
        checks = _by_what(engine_checks(make_settings(target=cluster)))
    finally:
        cluster.destroy()
    wal_level = checks["target main: wal_level"]
    assert wal_level.level == FAIL and wal_level.detail.startswith("minimal")
    assert wal_level.fix == "set wal_level = replica in postgresql.conf and restart the server"


def test_check_a_role_without_replication(make_settings, own_target: PgCluster) -> None:
    own_target.psql("DROP ROLE IF EXISTS plain; CREATE ROLE plain LOGIN")
    settings = make_settings(target=own_target)
    target = replace(
        settings.target("main"), conninfo=f"host=127.0.0.1 port={own_target.port} user=plain dbname=postgres"
    )
    checks = _by_what(engine_checks(replace(settings, targets={"main": target})))
    replication = checks["target main: replication"]
    assert replication.level == FAIL and "may not replicate" in replication.detail
    assert replication.fix.startswith("ALTER ROLE")


def test_check_the_slot_with_and_without_its_streamer(make_settings, own_target: PgCluster) -> None:
    settings = make_settings(target=own_target)
    run_init(settings, dry_run=False, say=lambda _: None)
    stopped = _by_what(engine_checks(settings))["target main: replication slot"]
    assert stopped.level == FAIL and "has no streamer connected" in stopped.detail

    with wal_streaming(worker_context(settings), connected=own_target):
        running = _by_what(engine_checks(settings))["target main: replication slot"]
    assert running.level == OK and "streamer connected" in running.detail


def _alone(settings: Settings) -> tuple[Settings, str]:
    """The same target under a name of its own: the session's control database holds other tests'
    backups and drills of `main`."""
    name = f"t{uuid.uuid4().hex[:8]}"
    return replace(settings, targets={name: replace(settings.target("main"), name=name)}), name


def test_check_a_stale_drill_and_a_failed_one(make_settings) -> None:
    settings, name = _alone(make_settings())
    ledger = worker_context(settings).ledger
    old = datetime.now(UTC) - timedelta(days=30)
    ledger._clock = lambda: old  # the drill finished a month ago
    ledger.record_drill(
        target=name,
        drill_id=uuid.uuid4().hex,
        point_in_time=old,
        succeeded=True,
        duration_seconds=3,
        detail="",
    )
    stale = _by_what(run_checks(settings))[f"target {name}: restore drill"]
    assert stale.level == FAIL and "older than its schedule" in stale.detail
    assert f"deskvault publish restore-drill --target {name}" in stale.fix

    ledger._clock = lambda: datetime.now(UTC)
    ledger.record_drill(
        target=name,
        drill_id=uuid.uuid4().hex,
        point_in_time=datetime.now(UTC),
        succeeded=False,
        duration_seconds=3,
        detail="",
    )
    failed = _by_what(run_checks(settings))[f"target {name}: restore drill"]
    assert failed.level == FAIL and failed.detail.endswith("failed")


def test_check_from_the_command_line_exits_with_the_worst_level(make_settings, tmp_path: Path) -> None:
    settings = make_settings()
    worker_context(settings)
    text = re.sub(
        r'(?m)^url = "amqp://[^"]*"',
        'url = "amqp://guest:guest@127.0.0.1:1/"',
        Path(settings.source).read_text(),
    )
    name = f"t{uuid.uuid4().hex[:8]}"  # a target no other test has backed up
    text = text.replace("[targets.main]", f"[targets.{name}]").replace(
        'target = "main"', f'target = "{name}"'
    )
    broken = tmp_path / "broken.toml"
    broken.write_text(text)
    run = subprocess.run(
        [sys.executable, "-m", "deskvault", "--config", str(broken), "check", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = json.loads(run.stdout)
    assert run.returncode == 2 == result["exit_code"]
    levels = {c["what"]: c["level"] for c in result["checks"]}
    assert levels["broker"] == FAIL and levels["configuration"] == OK
    assert levels[f"target {name}: newest full"] == WARN  # none yet

    unknown = subprocess.run(
        [sys.executable, "-m", "deskvault", "--config", str(settings.source), "check", "--target", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2
    assert unknown.stdout.startswith("FAIL  configuration: targets.nope: no such target")


def engine_checks(settings: Settings) -> list[Check]:
    from workers.engines.registry import engine_for

    return engine_for(settings.target("main")).readiness()
