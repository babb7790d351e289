"""How full each pool's queues are, read from RabbitMQ with passive declares (no plugin needed)."""

from __future__ import annotations

from typing import NamedTuple

import pika
import pika.exceptions

from messages.topology import dead_letter_queue

CONNECT_TIMEOUT_SECONDS = 3.0


class QueueDepth(NamedTuple):
    ready: int
    consumers: int
    dead_letters: int


def queue_depths(url: str, pools: tuple[str, ...]) -> dict[str, QueueDepth]:
    """pool -> depth; a pool whose queues are not declared yet (no worker or producer ran) is left out.

    Raises pika.exceptions.AMQPError or OSError if RabbitMQ cannot be reached.
    """
    params = pika.URLParameters(url)
    params.socket_timeout = params.blocked_connection_timeout = CONNECT_TIMEOUT_SECONDS
    connection = pika.BlockingConnection(params)
    found = {}
    try:
        channel = connection.channel()
        for pool in pools:
            try:
                work = channel.queue_declare(queue=pool, passive=True).method
                dead = channel.queue_declare(queue=dead_letter_queue(pool), passive=True).method
                found[pool] = QueueDepth(work.message_count, work.consumer_count, dead.message_count)
            except pika.exceptions.ChannelClosedByBroker:
                channel = connection.channel()
    finally:
        if connection.is_open:
            connection.close()
    return found
