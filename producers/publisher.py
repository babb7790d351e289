"""Publishing events to RabbitMQ with publisher confirms: a publish returns only once the broker has it.

Used by the scheduler and by `deskvault publish`; another service can do the same in any language
(see messages/schemas/README.md).
"""

from __future__ import annotations

import json
import logging
from types import TracebackType
from typing import Any

import pika
import pika.exceptions

from deskvault_core.errors import DeskvaultError
from deskvault_core.logs import redact
from messages.envelope import wrap
from messages.events import Event
from messages.outbound import OUTBOUND_EXCHANGE
from messages.topology import (
    EVENT_POOL,
    POOLS,
    dead_letter_queue,
    dead_letter_queue_arguments,
    delay_queue,
    work_queue_arguments,
)

log = logging.getLogger(__name__)


class PublishError(DeskvaultError):
    """RabbitMQ did not take an event."""

    exit_code = 3


class Publisher:
    """A confirmed channel to RabbitMQ that declares deskvault's queues before its first publish."""

    def __init__(self, url: str, *, delivery_limit: int) -> None:
        self._url = url
        self._delivery_limit = delivery_limit
        self._connection: pika.BlockingConnection | None = None
        self._channel: pika.adapters.blocking_connection.BlockingChannel | None = None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def _open(self) -> pika.adapters.blocking_connection.BlockingChannel:
        if self._channel is None or not self._channel.is_open:
            try:
                self._connection = pika.BlockingConnection(pika.URLParameters(self._url))
                channel = self._connection.channel()
                channel.confirm_delivery()
                declare_topology(channel, self._delivery_limit)
            except (pika.exceptions.AMQPError, OSError) as e:  # OSError: TLS refused the certificate
                self.close()
                raise PublishError(
                    f"cannot reach RabbitMQ at {redact(self._url)} ({type(e).__name__}: {e}); "
                    "check [broker] url (and ca_bundle for amqps://) and that RabbitMQ is running"
                ) from None
            self._channel = channel
        return self._channel

    def publish(self, event: Event) -> None:
        """Publish one event; returns once RabbitMQ confirmed it is stored in the pool's queue."""
        channel = self._open()
        pool = EVENT_POOL[event.type]
        try:
            channel.basic_publish(
                exchange="",
                routing_key=pool,
                body=wrap(event),
                properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
                mandatory=True,
            )
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
            raise PublishError(f"RabbitMQ refused {event.type} {event.idempotency_key}: {e}") from None
        except pika.exceptions.AMQPError as e:
            self.close()
            raise PublishError(f"lost RabbitMQ while publishing {event.type}: {type(e).__name__}") from None
        log.debug("published %s %s to %s", event.type, event.idempotency_key, pool)

    def publish_outbound(self, message: dict[str, Any]) -> bool:
        """Publish an outbound event (messages.outbound), confirmed; False if no queue is bound for it."""
        channel = self._open()
        try:
            channel.basic_publish(
                exchange=OUTBOUND_EXCHANGE,
                routing_key=message["type"],
                body=json.dumps(message).encode(),
                properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
                mandatory=True,
            )
        except pika.exceptions.UnroutableError:
            log.warning(
                "%s for %s: no queue is bound to exchange %s for it, so nobody was told; bind one",
                message["type"],
                message.get("tenant"),
                OUTBOUND_EXCHANGE,
            )
            return False
        except pika.exceptions.NackError as e:
            raise PublishError(f"RabbitMQ refused outbound {message['type']}: {e}") from None
        except pika.exceptions.AMQPError as e:
            self.close()
            raise PublishError(
                f"lost RabbitMQ while publishing {message['type']}: {type(e).__name__}"
            ) from None
        return True

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.close()
            except pika.exceptions.AMQPError:
                pass
        self._connection = None
        self._channel = None


def declare_topology(channel: pika.adapters.blocking_connection.BlockingChannel, delivery_limit: int) -> None:
    """Declare every pool's queue, delay queue and dead-letter queue exactly as the workers do."""
    channel.exchange_declare(OUTBOUND_EXCHANGE, exchange_type="topic", durable=True)
    for pool in POOLS:
        for name in (pool, delay_queue(pool)):
            channel.queue_declare(
                queue=name, durable=True, arguments=work_queue_arguments(name, delivery_limit)
            )
        channel.queue_declare(
            queue=dead_letter_queue(pool), durable=True, arguments=dead_letter_queue_arguments()
        )
