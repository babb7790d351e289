"""How full each pool's queues are, and whether they are declared as deskvault declares them, read from
RabbitMQ with declares (no management plugin needed)."""

from __future__ import annotations

from typing import NamedTuple

import pika
import pika.exceptions

from messages.topology import (
    POOLS,
    dead_letter_queue,
    dead_letter_queue_arguments,
    delay_queue,
    work_queue_arguments,
)

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


def topology_problems(url: str, delivery_limit: int) -> list[str]:
    """What is missing or differently declared among the pools' queues; [] when every queue is there
    with the arguments workers and producers declare. A declare with other arguments than a queue has is
    refused by RabbitMQ (PRECONDITION_FAILED), which is how a difference shows: nothing is created.

    Raises pika.exceptions.AMQPError or OSError if RabbitMQ cannot be reached.
    """
    params = pika.URLParameters(url)
    params.socket_timeout = params.blocked_connection_timeout = CONNECT_TIMEOUT_SECONDS
    connection = pika.BlockingConnection(params)
    problems = []
    try:
        channel = connection.channel()
        for pool in POOLS:
            for name in (pool, delay_queue(pool), dead_letter_queue(pool)):
                expected = (
                    dead_letter_queue_arguments()
                    if name == dead_letter_queue(pool)
                    else work_queue_arguments(name, delivery_limit)
                )
                try:
                    channel.queue_declare(queue=name, passive=True)
                except pika.exceptions.ChannelClosedByBroker:
                    problems.append(f"queue {name} is not declared")
                    channel = connection.channel()
                    continue
                try:
                    channel.queue_declare(queue=name, durable=True, arguments=expected)
                except pika.exceptions.ChannelClosedByBroker as e:
                    problems.append(
                        f"queue {name} has other arguments than deskvault declares ({e.reply_text})"
                    )
                    channel = connection.channel()
    finally:
        if connection.is_open:
            connection.close()
    return problems
