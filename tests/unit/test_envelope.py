"""wrap builds dramatiq envelopes that check_envelope accepts; each broken envelope is refused by field."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from dramatiq.message import Message
from hypothesis import given
from hypothesis import strategies as st

from messages import (
    EVENT_CLASSES,
    MAX_MESSAGE_BYTES,
    AccountExpired,
    AccountReactivated,
    BackupDue,
    Event,
    ExportRequested,
    InvalidEnvelope,
    PurgeDue,
    RestoreDrill,
    SnapshotDue,
    TenantRestoreRequested,
    check_envelope,
    decode_event,
    wrap,
)
from messages.envelope import ENVELOPE_KEYS
from messages.events import MAX_EVENT_BYTES
from messages.topology import EVENT_POOL, POOLS, actor_name, delay_queue

SLOT = datetime(2026, 11, 28, 4, tzinfo=UTC)
MESSAGE_ID = "3f2e1d0c-b9a8-4765-8432-10fedcba9876"


def backup() -> BackupDue:
    return BackupDue.new(target="helpdesk_main", kind="full", slot=SLOT)


def envelope(**changes: Any) -> dict[str, Any]:
    """A wrapped backup-due event, decoded, with keys replaced; a change to `...` removes the key."""
    fields = json.loads(wrap(backup(), message_id=MESSAGE_ID, now_ms=1795838400000))
    for key, value in changes.items():
        if value is ...:
            del fields[key]
        else:
            fields[key] = value
    return fields


def refused(fields: object, queue_name: str = "backup") -> InvalidEnvelope:
    with pytest.raises(InvalidEnvelope) as caught:
        check_envelope(fields, queue_name)
    return caught.value


def test_wrap_writes_dramatiqs_seven_keys_as_compact_json() -> None:
    # Given an event
    event = backup()
    # When it is wrapped with a fixed id and clock
    body = wrap(event, message_id=MESSAGE_ID, now_ms=1795838400000)
    # Then the body is compact JSON addressed to the event's pool and actor, carrying the event
    assert b": " not in body and b", " not in body
    assert json.loads(body) == {
        "queue_name": "backup",
        "actor_name": "backup_due",
        "args": [event.to_dict()],
        "kwargs": {},
        "options": {},
        "message_id": MESSAGE_ID,
        "message_timestamp": 1795838400000,
    }


def test_wrap_fills_a_fresh_message_id_and_the_current_time() -> None:
    first, second = (json.loads(wrap(backup())) for _ in range(2))
    assert first["message_id"] != second["message_id"]
    assert abs(first["message_timestamp"] - datetime.now(UTC).timestamp() * 1000) < 60_000


def test_wrap_writes_text_as_utf8_rather_than_escapes() -> None:
    event = ExportRequested.new(tenant="acme", request_id="r1", requested_by="Zoë")
    assert "Zoë".encode() in wrap(event)


def test_dramatiq_reads_a_wrapped_event() -> None:
    # Given a wrapped event
    event = backup()
    # When dramatiq decodes the body
    message = Message.decode(wrap(event, message_id=MESSAGE_ID))
    # Then it sees the actor, queue and id, and the one argument is the event
    assert (message.queue_name, message.actor_name, message.message_id) == (
        "backup",
        "backup_due",
        MESSAGE_ID,
    )
    assert decode_event(message.args[0]) == event


SAMPLES: dict[str, Event] = {
    "backup-due": backup(),
    "snapshot-due": SnapshotDue.new(server="db-1", slot=SLOT),
    "account-expired": AccountExpired.new(tenant="acme", plan="paid", expired_at=SLOT),
    "account-reactivated": AccountReactivated.new(tenant="acme"),
    "export-requested": ExportRequested.new(tenant="acme", request_id="r1", requested_by="ann"),
    "tenant-restore-requested": TenantRestoreRequested.new(
        tenant="acme", at=datetime(2026, 11, 27, 10, 14, tzinfo=UTC), request_id="r2", requested_by="ann"
    ),
    "restore-drill": RestoreDrill.new(target="helpdesk_main", slot=SLOT),
    "purge-due": PurgeDue.new(tenant="acme", purge_after=SLOT),
}


def test_there_is_a_sample_of_every_event_type() -> None:
    assert set(SAMPLES) == set(EVENT_CLASSES)


@pytest.mark.parametrize("event_type", list(SAMPLES))
def test_every_wrapped_event_passes_the_check_on_its_pool_and_delay_queue(event_type: str) -> None:
    # Given a wrapped event of each type
    event = SAMPLES[event_type]
    fields = json.loads(wrap(event))
    pool = EVENT_POOL[event_type]
    # Then it passes on its pool queue, and on the delay queue where dramatiq re-addresses retries
    check_envelope(fields, pool)
    check_envelope(fields, delay_queue(pool))
    check_envelope({**fields, "queue_name": delay_queue(pool)}, delay_queue(pool))
    assert decode_event(fields["args"][0]) == event


def test_a_restore_drill_is_addressed_to_the_verify_pool() -> None:
    # Given a wrapped restore-drill event
    fields = json.loads(wrap(SAMPLES["restore-drill"]))
    # Then it goes to the verify queue and its actor, and only the verify pool accepts it
    assert (fields["queue_name"], fields["actor_name"]) == ("verify", "restore_drill")
    check_envelope(fields, "verify")
    assert refused(fields, "backup").field == "envelope.queue_name"


def test_the_verify_pool_refuses_actors_of_other_pools() -> None:
    error = refused(envelope(queue_name="verify"), "verify")
    assert error.field == "envelope.actor_name"
    assert "(restore_drill)" in error.reason


def test_dramatiq_retry_options_are_accepted() -> None:
    options = {"retries": 2, "eta": 1795838460000, "traceback": "Traceback (most recent call last): ..."}
    check_envelope(envelope(options=options), "backup.DQ")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param([], "envelope", id="not-an-object"),
        pytest.param("{}", "envelope", id="text-not-decoded"),
        *[pytest.param(envelope(**{key: ...}), f"envelope.{key}", id=f"no-{key}") for key in ENVELOPE_KEYS],
        pytest.param(envelope(priority=0), "envelope.priority", id="extra-key"),
        pytest.param(envelope(queue_name="snapshot"), "envelope.queue_name", id="other-pool"),
        pytest.param(envelope(queue_name="backup.XQ"), "envelope.queue_name", id="dead-letter-queue"),
        pytest.param(envelope(queue_name=["backup"]), "envelope.queue_name", id="queue-not-string"),
        pytest.param(envelope(actor_name="snapshot_due"), "envelope.actor_name", id="actor-of-other-pool"),
        pytest.param(envelope(actor_name="restore_drill"), "envelope.actor_name", id="actor-of-verify-pool"),
        pytest.param(envelope(actor_name="backup-due"), "envelope.actor_name", id="event-type-not-actor"),
        pytest.param(envelope(actor_name=["backup_due"]), "envelope.actor_name", id="actor-not-string"),
        pytest.param(envelope(args={}), "envelope.args", id="args-object"),
        pytest.param(envelope(args=[]), "envelope.args", id="args-empty"),
        pytest.param(envelope(args=[{}, {}]), "envelope.args", id="args-two"),
        pytest.param(envelope(args=["backup-due"]), "envelope.args", id="args-not-object"),
        pytest.param(envelope(kwargs={"target": "crm"}), "envelope.kwargs", id="kwargs-not-empty"),
        pytest.param(envelope(kwargs=[]), "envelope.kwargs", id="kwargs-array"),
        pytest.param(envelope(options=None), "envelope.options", id="options-null"),
        *[
            pytest.param(envelope(options={key: value}), f"envelope.options.{key}", id=f"option-{key}")
            for key, value in (
                ("pipe_target", {"actor_name": "purge_due"}),
                ("on_success", "purge_due"),
                ("on_failure", "purge_due"),
                ("time_limit", 1),
                ("max_retries", 10**9),
                ("notify_shutdown", True),
            )
        ],
        pytest.param(envelope(options={"retries": -1}), "envelope.options.retries", id="retries-negative"),
        pytest.param(envelope(options={"eta": "soon"}), "envelope.options.eta", id="eta-text"),
        pytest.param(envelope(options={"traceback": "x" * 70_000}), "envelope.options.traceback", id="tb"),
        pytest.param(envelope(message_id=42), "envelope.message_id", id="message-id-number"),
        pytest.param(envelope(message_timestamp="1795838400000"), "envelope.message_timestamp", id="ts-text"),
        pytest.param(envelope(message_timestamp=1795838400.5), "envelope.message_timestamp", id="ts-float"),
        pytest.param(envelope(message_timestamp=True), "envelope.message_timestamp", id="ts-bool"),
    ],
)
def test_each_broken_envelope_is_refused_by_field(fields: object, field: str) -> None:
    assert refused(fields).field == field


def test_an_actor_of_another_pool_is_refused_with_the_pools_actors_listed() -> None:
    error = refused(envelope(queue_name="lifecycle", actor_name="backup_due"), "lifecycle")
    assert error.field == "envelope.actor_name"
    assert "account_expired, account_reactivated" in error.reason


def test_a_queue_that_is_not_a_pool_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="not a deskvault pool"):
        check_envelope(envelope(), "backup.XQ")


def test_the_largest_valid_event_wraps_well_within_the_message_limit() -> None:
    # Given an event with every field at its longest, in four-byte characters where allowed
    event = ExportRequested.new(
        tenant="t" * 63,
        request_id="r" * 128,
        requested_by="\U0001f600" * 256,
        as_of=SLOT.replace(microsecond=1),
        idempotency_key="k" * 200,
    )
    # Then its message is far inside the limit, which exists to turn away junk before parsing
    assert len(wrap(event)) < MAX_MESSAGE_BYTES - MAX_EVENT_BYTES


def test_actor_names_are_the_topology_ones() -> None:
    fields = envelope()
    assert fields["actor_name"] == actor_name("backup-due")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=8),
    max_leaves=20,
)


@given(
    body=st.binary(max_size=500) | _json.map(lambda v: json.dumps(v).encode()), pool=st.sampled_from(POOLS)
)
def test_the_consumer_check_turns_any_body_into_a_reason_or_a_pass(body: bytes, pool: str) -> None:
    from workers.broker import _envelope_problem

    try:
        problem = _envelope_problem(body, None, pool)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # not JSON at all: dramatiq's decoder refuses these before this check runs
    assert problem is None or problem.startswith(("InvalidEnvelope: envelope", "(payload)"))
