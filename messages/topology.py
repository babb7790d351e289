"""Where each event travels: pools, their queues, and how RabbitMQ must declare them.

Producers and workers both declare queues from here, so the two can never disagree on arguments
(RabbitMQ refuses a redeclaration whose arguments differ).
"""

from __future__ import annotations

POOLS: tuple[str, ...] = ("backup", "snapshot", "lifecycle", "export", "verify")

# Event type -> the pool (and so the queue) that handles it.
EVENT_POOL: dict[str, str] = {
    "backup-due": "backup",
    "snapshot-due": "snapshot",
    "account-expired": "lifecycle",
    "account-reactivated": "lifecycle",
    "purge-due": "lifecycle",
    "export-requested": "export",
    # Tenant data in and out share a pool: both restore a scratch server and move one database.
    "tenant-restore-requested": "export",
    "restore-drill": "verify",
}

# How many times RabbitMQ redelivers a message whose worker died before it is dead-lettered.
DEFAULT_DELIVERY_LIMIT = 5

# Dead letters are kept a week: long enough for an operator to inspect and replay them.
DEAD_LETTER_TTL_MS = 7 * 24 * 3600 * 1000


def actor_name(event_type: str) -> str:
    """The dramatiq actor that handles an event type: `backup-due` -> `backup_due`."""
    return event_type.replace("-", "_")


def delay_queue(pool: str) -> str:
    """dramatiq's queue for retries waiting out their backoff."""
    return f"{pool}.DQ"


def dead_letter_queue(pool: str) -> str:
    """dramatiq's name for a queue's dead letters."""
    return f"{pool}.XQ"


def work_queue_arguments(queue_name: str, delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> dict[str, object]:
    """Arguments for a pool queue or its delay queue: quorum, bounded redelivery, dead letters to .XQ."""
    pool = queue_name.removesuffix(".DQ")
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue(pool),
    }


def dead_letter_queue_arguments() -> dict[str, object]:
    return {"x-queue-type": "quorum", "x-message-ttl": DEAD_LETTER_TTL_MS}
