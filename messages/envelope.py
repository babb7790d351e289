"""The dramatiq envelope an event travels in: `wrap` builds one, `check_envelope` vets one as it arrives.

The event inside is checked separately, by `decode_event` on `args[0]`.
"""

from __future__ import annotations

import json
import time
import uuid

from .errors import InvalidEnvelope
from .events import MAX_EVENT_BYTES, Event, json_type, shown
from .topology import EVENT_POOL, actor_name, delay_queue

# The largest message a producer may publish: the largest event plus 4 KiB for dramatiq's keys and options
# (retry counts, eta). dramatiq's Retries middleware also stores a traceback in `options` when it re-enqueues,
# which can be longer, so this bounds fresh messages, not redeliveries.
MAX_MESSAGE_BYTES = MAX_EVENT_BYTES + 4096

# The options dramatiq itself writes on the way (a retry's count, traceback and requeue time; a delay's
# eta). Any other -- a pipe_target or on_success callback that would run another actor, a time_limit,
# max_retries -- would let a message steer the worker: deskvault sets those, never a message.
MESSAGE_OPTIONS = {
    "retries": "integer",
    "traceback": "string",
    "requeue_timestamp": "integer",
    "eta": "integer",
}
MAX_TRACEBACK_CHARS = 64 * 1024

ENVELOPE_KEYS = ("queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp")


def wrap(event: Event, *, message_id: str | None = None, now_ms: int | None = None) -> bytes:
    """The compact UTF-8 JSON message that dramatiq's RabbitMQ broker would publish for `event`."""
    envelope = {
        "queue_name": EVENT_POOL[event.type],
        "actor_name": actor_name(event.type),
        "args": [event.to_dict()],
        "kwargs": {},
        "options": {},
        "message_id": str(uuid.uuid4()) if message_id is None else message_id,
        "message_timestamp": int(time.time() * 1000) if now_ms is None else now_ms,
    }
    # Raw UTF-8 rather than \u escapes, so non-ASCII text cannot multiply an event's size on the wire.
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def check_envelope(fields: object, queue_name: str) -> None:
    """Raise InvalidEnvelope naming the field unless `fields` is a dramatiq envelope for this queue's pool."""
    pool = queue_name.removesuffix(".DQ")
    actors = {actor_name(event_type) for event_type, home in EVENT_POOL.items() if home == pool}
    if not actors:
        raise ValueError(f"{queue_name!r} is not a deskvault pool or delay queue")
    if not isinstance(fields, dict):
        raise InvalidEnvelope("envelope", f"expected a JSON object, got {json_type(fields)}")
    for key in ENVELOPE_KEYS:
        if key not in fields:
            raise InvalidEnvelope(f"envelope.{key}", "missing required field")
    for key in fields:
        if key not in ENVELOPE_KEYS:
            raise InvalidEnvelope(f"envelope.{key}", "unknown field; dramatiq envelopes have only its seven")
    # dramatiq re-addresses a message to the delay queue while it waits out a retry backoff.
    if fields["queue_name"] not in (pool, delay_queue(pool)):
        raise InvalidEnvelope("envelope.queue_name", f"expected {pool!r}, got {shown(fields['queue_name'])}")
    if not isinstance(fields["actor_name"], str) or fields["actor_name"] not in actors:
        expected = ", ".join(sorted(actors))
        got = shown(fields["actor_name"])
        raise InvalidEnvelope(
            "envelope.actor_name", f"expected an actor of pool {pool!r} ({expected}); got {got}"
        )
    args = fields["args"]
    if not (isinstance(args, list) and len(args) == 1 and isinstance(args[0], dict)):
        raise InvalidEnvelope("envelope.args", "expected a list holding exactly one event object")
    if not isinstance(fields["kwargs"], dict) or fields["kwargs"]:
        raise InvalidEnvelope("envelope.kwargs", "expected an empty object")
    _expect(fields, "options", "object")
    _check_options(fields["options"])
    _expect(fields, "message_id", "string")
    _expect(fields, "message_timestamp", "integer")


def _check_options(options: dict[str, object]) -> None:
    for key, value in options.items():
        if key not in MESSAGE_OPTIONS:
            raise InvalidEnvelope(
                f"envelope.options.{key}",
                "not accepted from a message (only dramatiq's own: " + ", ".join(MESSAGE_OPTIONS) + ")",
            )
        where, expected = f"envelope.options.{key}", MESSAGE_OPTIONS[key]
        if json_type(value) != expected or (isinstance(value, int) and value < 0):
            raise InvalidEnvelope(where, f"expected a non-negative {expected}, got {shown(value)}")
        if isinstance(value, str) and len(value) > MAX_TRACEBACK_CHARS:
            raise InvalidEnvelope(where, f"longer than {MAX_TRACEBACK_CHARS} characters")


def _expect(fields: dict[str, object], key: str, expected: str) -> None:
    if json_type(fields[key]) != expected:
        raise InvalidEnvelope(f"envelope.{key}", f"expected {expected}, got {json_type(fields[key])}")
