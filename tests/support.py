"""Helpers shared by the integration tests (plain functions; the fixtures are in conftest.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import boto3

from deskvault.config import Settings
from workers.context import WorkerContext, open_ledger, open_repository

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_context(settings: Settings) -> WorkerContext:
    """What a worker process builds at start-up, against the test's services."""
    ledger = open_ledger(settings)
    ledger.migrate()
    repository = open_repository(settings)
    repository.store.ensure_bucket()
    return WorkerContext(settings=settings, ledger=ledger, repository=repository)


def raw_s3(settings: Settings) -> Any:
    """A plain boto3 client on the repository's bucket, to look at (or damage) stored bytes directly."""
    r = settings.repository
    return boto3.client(
        "s3",
        endpoint_url=r.endpoint,
        aws_access_key_id=r.access_key,
        aws_secret_access_key=r.secret_key,
        region_name=r.region,
    )


def wait_for(probe: Callable[[], T | None], *, timeout: float = 30.0, what: str = "condition") -> T:
    """Poll until `probe` returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)
