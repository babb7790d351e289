"""`deskvault status`: is every target protected right now, and are the pools keeping up?"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions

from deskvault.config import Settings
from messages.topology import POOLS, dead_letter_queue, delay_queue
from workers.context import open_ledger


def collect_status(settings: Settings) -> dict[str, Any]:
    now = datetime.now(UTC)
    ledger = open_ledger(settings)
    targets = {}
    for name in sorted(settings.targets):
        newest = ledger.newest_backup_time(name, "full")
        targets[name] = {
            "newest_full": newest.isoformat() if newest else None,
            "newest_full_age_seconds": int((now - newest).total_seconds()) if newest else None,
        }
    jobs: dict[str, dict[str, int]] = {pool: {} for pool in POOLS}
    for (pool, state), count in ledger.job_counts().items():
        jobs.setdefault(pool, {})[state] = count
    return {
        "at": now.isoformat(),
        "targets": targets,
        "queues": _queue_depths(settings.broker.url),
        "jobs": jobs,
    }


def _queue_depths(url: str) -> dict[str, Any]:
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError as e:
        return {"error": f"RabbitMQ unreachable: {type(e).__name__}"}
    depths: dict[str, Any] = {}
    try:
        channel = connection.channel()
        for pool in POOLS:
            row = {}
            for label, queue in (
                ("ready", pool),
                ("retrying", delay_queue(pool)),
                ("dead_letters", dead_letter_queue(pool)),
            ):
                try:
                    ok = channel.queue_declare(queue=queue, passive=True)
                    row[label] = ok.method.message_count
                    if label == "ready":
                        row["consumers"] = ok.method.consumer_count
                except pika.exceptions.ChannelClosedByBroker:
                    row[label] = None  # not declared yet: no worker or producer has run
                    channel = connection.channel()
            depths[pool] = row
    finally:
        connection.close()
    return depths


def render_status(status: dict[str, Any]) -> str:
    lines = [
        f"deskvault status at {status['at']}",
        "",
        "TARGET               NEWEST FULL                  AGE",
    ]
    for name, t in status["targets"].items():
        age = _age(t["newest_full_age_seconds"])
        newest = t["newest_full"][:19].replace("T", " ") + "Z" if t["newest_full"] else "none yet"
        lines.append(f"{name:<20} {newest:<28} {age}")
    lines += ["", "POOL        READY  RETRYING  DEAD  CONSUMERS  JOBS"]
    queues = status["queues"]
    if "error" in queues:
        lines.append(f"  {queues['error']}")
    for pool in POOLS:
        q = queues.get(pool, {})
        jobs = ", ".join(f"{state} {n}" for state, n in sorted(status["jobs"].get(pool, {}).items())) or "-"
        lines.append(
            f"{pool:<10} {_n(q.get('ready')):>6} {_n(q.get('retrying')):>9} "
            f"{_n(q.get('dead_letters')):>5} {_n(q.get('consumers')):>10}  {jobs}"
        )
    return "\n".join(lines)


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m"
