"""Dead letters for operators: see why each message was refused, replay it once fixed, or drop it.

A pool's dead letters wait in `<pool>.XQ` (kept a week) with the reason in the `x-deskvault-reason`
header. Listing takes messages without acknowledging them and closes the channel, which puts them all
back. Replay publishes a message to its pool's queue exactly as it was (publisher confirms), and only
then removes it from the dead letters: a crash in between leaves a copy in both, which the workers'
ledger makes harmless (the same event has one effect).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions

from deskvault_core.errors import DeskvaultError
from deskvault_core.logs import redact
from messages.topology import POOLS, dead_letter_queue
from workers.broker import REASON_HEADER


@dataclass(frozen=True)
class DeadLetter:
    message_id: str  # the dramatiq message id, or "sha256:<12 hex>" of a body that has none
    event_type: str | None
    idempotency_key: str | None
    reason: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "event_type": self.event_type,
            "idempotency_key": self.idempotency_key,
            "reason": self.reason,
            "size": self.size,
        }


def list_dead_letters(url: str, pool: str, limit: int = 100) -> list[DeadLetter]:
    """Up to `limit` dead letters of `pool`, oldest first; all stay in the queue."""
    found: list[DeadLetter] = []
    with _channel(url, pool) as channel:
        for _, properties, body in _take(channel, pool, limit):
            found.append(_describe(properties, body))
    return found


def replay(url: str, pool: str, wanted: Callable[[DeadLetter], bool], limit: int = 10_000) -> list[str]:
    """Publish the dead letters `wanted` selects back to the pool's queue; their message ids."""
    return _act(url, pool, wanted, limit, republish=True)


def drop(url: str, pool: str, wanted: Callable[[DeadLetter], bool], limit: int = 10_000) -> list[str]:
    """Delete the dead letters `wanted` selects for good; their message ids."""
    return _act(url, pool, wanted, limit, republish=False)


def _act(
    url: str, pool: str, wanted: Callable[[DeadLetter], bool], limit: int, *, republish: bool
) -> list[str]:
    done = []
    with _channel(url, pool) as channel:
        channel.confirm_delivery()
        for method, properties, body in _take(channel, pool, limit):
            letter = _describe(properties, body)
            if not wanted(letter):
                continue  # left unacknowledged: it goes back when the channel closes
            if republish:
                headers = {k: v for k, v in (properties.headers or {}).items() if not k.startswith("x-")}
                channel.basic_publish(
                    exchange="",
                    routing_key=pool,
                    body=_fresh(body),
                    properties=pika.BasicProperties(
                        delivery_mode=2, content_type=properties.content_type, headers=headers or None
                    ),
                    mandatory=True,
                )
            channel.basic_ack(method.delivery_tag)
            done.append(letter.message_id)
    return done


def _fresh(body: bytes) -> bytes:
    """The message as first published: dramatiq's retry count and traceback are dropped, so a replay
    gets its retries again."""
    try:
        message = json.loads(body)
    except ValueError:
        return body
    if not isinstance(message, dict) or not isinstance(message.get("options"), dict):
        return body
    options = {k: v for k, v in message["options"].items() if k not in ("retries", "traceback")}
    return json.dumps({**message, "options": options}).encode()


def _take(channel: Any, pool: str, limit: int) -> Iterator[tuple[Any, Any, bytes]]:
    for _ in range(limit):
        method, properties, body = channel.basic_get(dead_letter_queue(pool), auto_ack=False)
        if method is None:
            return
        yield method, properties, body


def _describe(properties: Any, body: bytes) -> DeadLetter:
    reason = str((properties.headers or {}).get(REASON_HEADER, "(no reason recorded)"))
    try:
        message = json.loads(body)
        event = message["args"][0] if isinstance(message, dict) and message.get("args") else {}
        message_id = str(message["message_id"])
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        return DeadLetter(f"sha256:{hashlib.sha256(body).hexdigest()[:12]}", None, None, reason, len(body))
    event = event if isinstance(event, dict) else {}
    return DeadLetter(
        message_id,
        _text(event.get("type")),
        _text(event.get("idempotency_key")),
        reason,
        len(body),
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


@contextmanager
def _channel(url: str, pool: str) -> Iterator[Any]:
    if pool not in POOLS:
        raise DeskvaultError(f"--pool: {pool!r} is not a pool (pools: {', '.join(POOLS)})")
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except (pika.exceptions.AMQPError, OSError) as e:  # OSError: TLS refused the certificate
        raise DeskvaultError(
            f"cannot reach RabbitMQ at {redact(url)} ({type(e).__name__}); check [broker] url and ca_bundle"
        ) from None
    try:
        yield connection.channel()
    finally:
        # Closing returns every message taken but not acknowledged to the dead-letter queue.
        if connection.is_open:
            connection.close()
