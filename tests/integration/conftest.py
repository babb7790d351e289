"""Integration fixtures: a local SeaweedFS (started once, reused across sessions) and per-test S3 stores."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from deskvault.local.seaweedfs import S3Endpoint, SeaweedError, ensure_running, stop
from workers.engines.postgresql.cluster import PgCluster, free_port
from workers.repository.s3 import MIN_PART_SIZE, S3Store

STATE_DIR = Path(__file__).resolve().parents[2] / ".deskvault"
TEST_BUCKET = "deskvault-test"
FALLBACK_S3_PORT = 8443


@pytest.fixture(scope="session")
def s3_endpoint() -> S3Endpoint:
    """The S3 endpoint of the repository's local SeaweedFS; skips locally, fails in CI, if it can't start.

    Port 8333 may already serve another checkout's SeaweedFS (with other credentials); the tests then
    start their own on 8443 rather than fail.
    """
    try:
        try:
            return ensure_running(STATE_DIR)
        except SeaweedError as exc:
            if "is taken" not in str(exc):
                raise
            return ensure_running(STATE_DIR, s3_port=FALLBACK_S3_PORT)
    except Exception as exc:
        message = f"SeaweedFS could not be started: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def s3_store(s3_endpoint: S3Endpoint) -> Iterator[S3Store]:
    """An S3Store on the test bucket under a fresh prefix (5 MiB parts), emptied afterwards."""
    store = S3Store(
        bucket=TEST_BUCKET,
        prefix=f"t-{uuid4().hex[:12]}/",
        endpoint_url=s3_endpoint.endpoint_url,
        access_key=s3_endpoint.access_key,
        secret_key=s3_endpoint.secret_key,
        region=s3_endpoint.region,
        part_size=MIN_PART_SIZE,
    )
    store.ensure_bucket()
    yield store
    for key in list(store.list_keys()):
        store.delete(key)
    uploads = store.client.list_multipart_uploads(Bucket=TEST_BUCKET, Prefix=store.prefix).get("Uploads", [])
    for upload in uploads:
        store.client.abort_multipart_upload(
            Bucket=TEST_BUCKET, Key=upload["Key"], UploadId=upload["UploadId"]
        )


@pytest.fixture(scope="session")
def big_cluster(scratch_dir: Path) -> Iterator[PgCluster]:
    """A target whose base backup takes many 5 MiB parts (about 100 MiB of incompressible rows)."""
    cluster = PgCluster(scratch_dir / f"big-{uuid4().hex[:6]}", free_port(), tcp=True)
    cluster.initdb()
    cluster.start()
    cluster.psql(
        "CREATE TABLE blobs AS SELECT g AS id,"
        " string_agg(decode(md5(random()::text), 'hex'), ''::bytea) AS body"
        " FROM generate_series(1, 50000) g, generate_series(1, 128) r GROUP BY g"
    )
    cluster.psql("CHECKPOINT")
    yield cluster
    cluster.destroy()


class OwnSeaweedFS:
    """A SeaweedFS of one test's own (ports picked free), so stopping it disturbs no other test."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.port = next(p for p in (random.randrange(40000, 50000, 10) for _ in range(50)) if _ports_free(p))
        self.https_port = self.port + 5

    def start(self, https: tuple[Path, Path] | None = None) -> S3Endpoint:
        """Start (or find running) and return its plain-HTTP endpoint; `https`: (certificate, key)."""
        tls = (self.https_port, *https) if https else None
        return ensure_running(self.state, s3_port=self.port, https=tls)

    def stop(self) -> None:
        stop(self.state)


def _ports_free(base: int) -> bool:
    """The ports ensure_running derives from `base`, their gRPC twins, and base + 5 for HTTPS."""
    ports = [*range(base - 3, base + 2), *range(base + 10000 - 3, base + 10000 + 2), base + 5]
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@pytest.fixture
def own_seaweedfs(tmp_path: Path) -> Iterator[OwnSeaweedFS]:
    state = tmp_path / "seaweed-state"
    state.mkdir()
    own = OwnSeaweedFS(state)
    yield own
    own.stop()
