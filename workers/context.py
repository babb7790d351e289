"""What a worker process's handlers share: settings, the ledger, the repository; built once per process."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from deskvault_core.config import Settings
from workers.ledger.ledger import Ledger
from workers.repository.keyring import Keyring
from workers.repository.objects import ObjectRepository
from workers.repository.s3 import S3Store


@dataclass
class WorkerContext:
    settings: Settings
    ledger: Ledger
    repository: ObjectRepository
    # Identifies this process in lease records, so an operator can tell who holds a job.
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")


def open_store(settings: Settings) -> S3Store:
    """The bucket alone (no keys): for what checks or creates it."""
    r = settings.repository
    return S3Store(
        bucket=r.bucket,
        prefix=r.prefix,
        endpoint_url=r.endpoint or None,
        access_key=r.access_key or None,
        secret_key=r.secret_key or None,
        region=r.region,
        ca_bundle=r.ca_bundle or None,
        part_size=r.part_size_mib * 1024 * 1024,
        upload_threads=r.upload_threads,
    )


def open_repository(settings: Settings) -> ObjectRepository:
    r = settings.repository
    return ObjectRepository(
        open_store(settings),
        Keyring.load(Path(r.key_file)),
        zstd_level=r.zstd_level,
        zstd_threads=r.zstd_threads,
    )


def open_ledger(settings: Settings) -> Ledger:
    return Ledger(settings.control_db.odbc, lease_seconds=settings.control_db.lease_seconds)


_context: WorkerContext | None = None
_lock = threading.Lock()


def configure(context: WorkerContext) -> None:
    global _context
    _context = context


def current() -> WorkerContext:
    if _context is None:
        raise RuntimeError("worker context not configured; start workers with `deskvault worker`")
    return _context


def build(settings: Settings) -> WorkerContext:
    ledger = open_ledger(settings)
    ledger.migrate()  # deskvault owns its schema: a new control database is set up on first start
    return WorkerContext(settings=settings, ledger=ledger, repository=open_repository(settings))
