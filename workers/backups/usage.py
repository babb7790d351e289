"""What a target occupies in the repository, by area (`backups`, `wal`), kept in the ledger for metrics.

Measured after each full backup (with its retention run) and each hourly log backup.
"""

from __future__ import annotations

from datetime import datetime

from deskvault_core.config import TargetSettings
from workers.backups.expire import ExpireResult, expire
from workers.ledger.ledger import Ledger
from workers.repository.objects import ObjectRepository

AREAS = ("backups", "wal")


def measure(repo: ObjectRepository, target: str) -> dict[str, tuple[int, int]]:
    """area -> (objects, stored bytes), from one listing of the target's prefix."""
    prefix = f"targets/{target}/"
    usage = {area: (0, 0) for area in AREAS}
    for entry in repo.store.list_entries(prefix):
        area = entry.key[len(prefix) :].split("/", 1)[0]
        objects, size = usage.get(area, (0, 0))
        usage[area] = (objects + 1, size + entry.size)
    return usage


def record(ledger: Ledger, repo: ObjectRepository, target: str) -> None:
    for area, (objects, stored_bytes) in measure(repo, target).items():
        ledger.record_usage(target, area, objects, stored_bytes)


def expire_and_record(
    ledger: Ledger, repo: ObjectRepository, target: TargetSettings, now: datetime
) -> ExpireResult:
    """Apply retention, then bring the ledger's backup index and the target's usage up to date."""
    result = expire(repo, target, now, dry_run=False)
    ledger.forget_backups(target.name, list(result.forgotten))
    record(ledger, repo, target.name)
    return result
