"""Fixtures that start real services once per session: a RabbitMQ vhost, a control database, a PostgreSQL
target cluster. Locally a service that cannot be reached skips its tests; in CI (CI=true) it fails them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import build_settings, free_port, rabbit_vhost, scratch_database

from deskvault.local.demo_data import helpdesk_sql
from deskvault_core.config import Settings
from workers.engines.postgresql.cluster import ClusterError, PgCluster
from workers.repository.keyring import Keyring

IN_CI = bool(os.environ.get("CI"))


def unavailable(what: str, detail: str) -> None:
    message = f"{what} is not available: {detail}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's DESKVAULT_* variables must not leak into tests.
    for name in list(os.environ):
        if name.startswith("DESKVAULT_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def scratch_dir() -> Iterator[Path]:
    """A temporary folder the postgres user can reach (clusters live inside it)."""
    path = Path(tempfile.mkdtemp(prefix="deskvault-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def rabbit_url() -> Iterator[str]:
    """A private RabbitMQ vhost for this test session, deleted afterwards."""
    try:
        with rabbit_vhost("deskvault-test") as url:
            yield url
    except (OSError, subprocess.SubprocessError) as e:
        unavailable("RabbitMQ (rabbitmqctl)", str(e))


@pytest.fixture(scope="session")
def mariadb_control_odbc() -> Iterator[str]:
    """A fresh control database on the machine's MariaDB, reached through its ODBC driver."""
    try:
        with scratch_database("mariadb") as odbc:
            yield odbc
    except (OSError, subprocess.SubprocessError) as e:
        unavailable("MariaDB on its local socket", str(e))


@pytest.fixture(scope="session")
def control_db_odbc() -> Iterator[str]:
    """A fresh control database on the machine's PostgreSQL, reached through psqlODBC."""
    try:
        with scratch_database() as odbc:
            yield odbc
    except (OSError, subprocess.SubprocessError) as e:
        unavailable("PostgreSQL on 127.0.0.1:5432", str(e))


@pytest.fixture(scope="session")
def pg_target(scratch_dir: Path) -> Iterator[PgCluster]:
    """A real PostgreSQL 15 cluster (run as the postgres user) holding two tenants' helpdesk databases."""
    cluster = PgCluster(scratch_dir / "target-pg", free_port(), tcp=True)
    try:
        cluster.initdb()
        cluster.start()
    except (ClusterError, OSError) as e:
        unavailable("PostgreSQL server binaries", str(e))
    for tenant in TENANTS:
        cluster.psql(f"CREATE DATABASE {tenant}")
        cluster.psql(helpdesk_sql(tenant), tenant)
    yield cluster
    cluster.destroy()


TENANTS = ("acme", "globex")


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    Keyring.create(path)
    return path


@pytest.fixture
def make_settings(tmp_path: Path, key_file: Path, request: pytest.FixtureRequest) -> Callable[..., Settings]:
    """Settings pointing at the session's real services, with a fresh bucket prefix per call."""

    def make(
        *,
        servers: dict[str, str] | None = None,
        lease_seconds: int = 120,
        target: PgCluster | None = None,
        extra: str = "",
        target_options: str = "",
        s3: Any = None,
        retries: tuple[int, int, int] = (2, 200, 3_600_000),
    ) -> Settings:
        """`retries`: (max_retries, min_backoff_ms, max_backoff_ms); `s3`: another S3 endpoint;
        `target_options`: TOML lines for [targets.main]."""
        return build_settings(
            tmp_path,
            key_file,
            s3 or request.getfixturevalue("s3_endpoint"),
            request.getfixturevalue("rabbit_url"),
            request.getfixturevalue("control_db_odbc"),
            target or request.getfixturevalue("pg_target"),
            servers=servers,
            lease_seconds=lease_seconds,
            extra=extra,
            target_options=target_options,
            retries=retries,
        )

    return make


@pytest.fixture
def unique_key() -> str:
    return f"test:{uuid.uuid4().hex}"
