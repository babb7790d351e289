"""dramatiq's RabbitMQ broker, extended: quorum queues, bounded redelivery, and dead letters that say why.

dramatiq declares classic queues and rejects failed messages with a bare `basic_nack`, so RabbitMQ
dead-letters them without any reason. Here the queues come from `messages.topology`, and every message
that fails for good -- undecodable, oversized, a malformed envelope, a handler's permanent error,
retries exhausted -- is republished to the pool's `.XQ` queue with the reason in its headers (publisher
confirm first, then ack), so nothing is lost and an operator can see what was wrong.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer
from dramatiq.errors import DecodeError
from dramatiq.message import Message

from messages.envelope import MAX_MESSAGE_BYTES, check_envelope
from messages.errors import MessageError
from messages.topology import dead_letter_queue, dead_letter_queue_arguments, work_queue_arguments
from workers import metrics
from workers.errors import PERMANENT_ERRORS

log = logging.getLogger(__name__)

REASON_HEADER = "x-deskvault-reason"
MAX_REASON_CHARS = 2000


class DeskvaultBroker(RabbitmqBroker):
    """RabbitmqBroker with deskvault's queue topology and dead-lettering consumer; confirms every publish."""

    def __init__(self, *, url: str, delivery_limit: int, middleware: list[Any] | None = None) -> None:
        super().__init__(url=url, confirm_delivery=True, middleware=middleware)
        self.delivery_limit = delivery_limit

    @property
    def consumer_class(self) -> type[_RabbitmqConsumer]:
        return DeadLetteringConsumer

    def _build_queue_arguments(self, queue_name: str) -> dict[str, object]:
        return work_queue_arguments(queue_name, self.delivery_limit)

    def _declare_xq_queue(self, queue_name: str) -> Any:
        return self.channel.queue_declare(
            queue=dead_letter_queue(queue_name), durable=True, arguments=dead_letter_queue_arguments()
        )

    def dead_letter(self, queue_name: str, body: bytes, properties: Any, reason: str) -> None:
        """Publish a message to the pool's dead-letter queue with the reason; returns once confirmed."""
        pool = metrics.pool_of(queue_name)
        headers = dict(getattr(properties, "headers", None) or {})
        headers[REASON_HEADER] = reason[:MAX_REASON_CHARS]
        headers["x-deskvault-queue"] = queue_name
        headers["x-deskvault-dead-lettered-at"] = int(time.time() * 1000)
        self.channel.basic_publish(
            exchange="",
            routing_key=dead_letter_queue(pool),
            body=body,
            properties=pika.BasicProperties(
                delivery_mode=2,
                headers=headers,
                content_type=getattr(properties, "content_type", None),
            ),
            mandatory=True,
        )
        metrics.EVENTS_DEAD_LETTERED.labels(pool, _event_type_of_body(body)).inc()
        log.warning("dead-lettered a message from %s: %s", queue_name, reason[:300])


class _DecodeFailureLogged(logging.Filter):
    """dramatiq logs a traceback for each undecodable body; dead-lettering logs it once, with the reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to decode message")


_DECODE_FAILURE_LOGGED = _DecodeFailureLogged()


class DeadLetteringConsumer(_RabbitmqConsumer):
    """Checks every delivery before dramatiq sees it and dead-letters failures with their reason."""

    def __init__(self, broker: DeskvaultBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self.logger.addFilter(_DECODE_FAILURE_LOGGED)
        self._last: tuple[Any, Any, bytes] | None = None
        self.iterator = self._remember(self.iterator)

    def _remember(self, deliveries: Iterator[Any]) -> Iterator[Any]:
        # dramatiq's __next__ drops the raw body; keep the newest delivery so a rejection can republish it.
        for delivery in deliveries:
            self._last = delivery if delivery[0] is not None else None
            yield delivery

    def __next__(self) -> Any:
        message = super().__next__()
        if message is None or self._last is None:
            return message
        method, properties, body = self._last
        problem = _envelope_problem(body, message, self.queue_name)
        if problem:
            self.known_tags.discard(method.delivery_tag)
            self._dead_letter_and_ack(method.delivery_tag, body, properties, problem)
            return None
        message.raw_delivery = (body, properties)
        return message

    def _nack(self, tag: int) -> None:
        # dramatiq calls this directly only for bodies it could not decode at all.
        if self._last is not None and self._last[0].delivery_tag == tag:
            _, properties, body = self._last
            self._dead_letter_and_ack(tag, body, properties, _undecodable_reason(body))
        else:  # pragma: no cover - defensive: never leave a message unanswered
            super()._nack(tag)

    def nack(self, message: Any) -> None:
        # dramatiq nacks a message that failed for good (permanent error or retries exhausted).
        self.known_tags.discard(message._tag)
        body, properties = getattr(message, "raw_delivery", (message.encode(), None))
        self._dead_letter_and_ack(message._tag, body, properties, _failure_reason(message))

    def _dead_letter_and_ack(self, tag: int, body: bytes, properties: Any, reason: str) -> None:
        try:
            self.broker.dead_letter(self.queue_name, body, properties, reason)
        except Exception:
            # Could not republish: let RabbitMQ dead-letter it natively (reason lost, message kept).
            log.exception("could not publish to the dead-letter queue; rejecting without a reason")
            self.connection.add_callback_threadsafe(lambda: self.channel.basic_nack(tag, requeue=False))
            return
        self.connection.add_callback_threadsafe(lambda: self.channel.basic_ack(tag))


def _envelope_problem(body: bytes, message: Any, queue_name: str) -> str | None:
    if len(body) > MAX_MESSAGE_BYTES:
        return f"(payload): {len(body)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit"
    try:
        check_envelope(json.loads(body), queue_name)
    except MessageError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _undecodable_reason(body: bytes) -> str:
    try:
        Message.decode(body)
    except DecodeError as e:
        cause = e.__cause__ or e
        return f"InvalidEnvelope: (payload): not a dramatiq message: {type(cause).__name__}: {cause}"[:500]
    return "InvalidEnvelope: (payload): not a dramatiq message"


def _failure_reason(message: Any) -> str:
    exception = getattr(message, "_exception", None)
    if exception is None:
        return "failed without an exception (rejected by middleware)"
    # dramatiq's Retries counts a failure before deciding whether to retry it, so once retries ran out
    # the count includes the last attempt; a permanent error leaves it at the retries already made.
    failures = message.options.get("retries", 0)
    if isinstance(exception, PERMANENT_ERRORS):
        prefix = f"after {failures} retries: " if failures else ""
    else:
        prefix = f"after {failures} attempts: "
    return f"{prefix}{type(exception).__name__}: {exception}"


def _event_type_of_body(body: bytes) -> str:
    try:
        return metrics.event_type_of(json.loads(body).get("actor_name", ""))
    except Exception:
        return "unknown"
