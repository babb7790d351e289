"""The JSON Schema files agree with the Python classes and decoder, so any language can publish events."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from messages import (
    EVENT_CLASSES,
    AccountExpired,
    AccountReactivated,
    BackupDue,
    Event,
    ExportRequested,
    InvalidEvent,
    RestoreDrill,
    SnapshotDue,
    TenantRestoreRequested,
    check_envelope,
    decode_event,
    wrap,
)
from messages.schema_files import SCHEMA_DIR, load_schema, schema_path
from messages.topology import EVENT_POOL

SLOT = datetime(2026, 11, 28, 4, tzinfo=UTC)
NAMES = [*EVENT_CLASSES, "envelope"]
REGISTRY: Registry = Registry().with_resources(
    (schema["$id"], Resource.from_contents(schema)) for schema in map(load_schema, NAMES)
)


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(
        load_schema(name), registry=REGISTRY, format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def samples() -> list[Event]:
    """Valid events of every type, with optional fields both filled and left out."""
    return [
        BackupDue.new(target="helpdesk_main", kind="diff", slot=SLOT),
        SnapshotDue.new(server="db-eu-1.internal", slot=SLOT),
        AccountExpired.new(tenant="acme", plan="paid", expired_at=SLOT),
        AccountExpired.new(
            tenant="acme", plan="trial", expired_at=SLOT, trial_started_at=SLOT - timedelta(days=14)
        ),
        AccountReactivated.new(tenant="acme"),
        ExportRequested.new(tenant="acme", request_id="EXP-1", requested_by="Zoë <z@acme.example>"),
        ExportRequested.new(tenant="acme", request_id="EXP-2", requested_by="ann", as_of=SLOT),
        RestoreDrill.new(target="helpdesk_main", slot=SLOT),
        TenantRestoreRequested.new(tenant="acme", at=SLOT, request_id="RST-1", requested_by="ann"),
        TenantRestoreRequested.new(
            tenant="acme", at=SLOT, request_id="RST-2", requested_by="ann", as_name="acme_yesterday"
        ),
        TenantRestoreRequested.new(
            tenant="acme", at=SLOT, request_id="RST-3", requested_by="ann", mode="replace", force=True
        ),
    ]


def test_there_is_one_schema_file_per_event_type_and_one_for_the_envelope() -> None:
    on_disk = {path.name for path in SCHEMA_DIR.glob("*.json")}
    assert on_disk == {schema_path(name).name for name in NAMES}
    assert schema_path("backup-due").name == "backup-due.v1.schema.json"


def test_an_unknown_schema_name_is_refused() -> None:
    with pytest.raises(ValueError, match="no schema for 'weekly-report'"):
        schema_path("weekly-report")


@pytest.mark.parametrize("name", NAMES)
def test_every_schema_is_a_valid_2020_12_schema(name: str) -> None:
    schema = load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith("/" + schema_path(name).name)
    Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("event_type", list(EVENT_CLASSES))
def test_the_example_validates_and_decodes(event_type: str) -> None:
    # Given the schema's one example
    (example,) = load_schema(event_type)["examples"]
    # Then the schema accepts it, and so does the decoder
    validator(event_type).validate(example)
    event = decode_event(example)
    assert event.type == event_type
    validator(event_type).validate(event.to_dict())


def test_the_envelope_example_validates_and_passes_the_envelope_check() -> None:
    (example,) = load_schema("envelope")["examples"]
    validator("envelope").validate(example)
    check_envelope(example, example["queue_name"])
    decode_event(example["args"][0])


@pytest.mark.parametrize("cls", list(EVENT_CLASSES.values()), ids=list(EVENT_CLASSES))
def test_properties_and_required_match_the_dataclass(cls: type[Event]) -> None:
    # Given the schema and the class for an event type
    schema = load_schema(cls.type)
    specs = {f.name: f.metadata["spec"] for f in fields(cls)}
    # Then they name the same fields, and require the same ones
    assert list(schema["properties"]) == ["type", *specs]
    assert schema["required"] == ["type", *(name for name, spec in specs.items() if not spec.optional)]
    # And every field is described, with the wire type the decoder expects
    for name, spec in specs.items():
        prop = schema["properties"][name]
        assert prop["description"]
        expected = [spec.json_type, "null"] if spec.optional else spec.json_type
        assert prop["type"] == expected, name
        assert ("pattern" in prop and prop.get("format") == "date-time") == (spec.kind == "timestamp"), name
    assert schema["additionalProperties"] is False
    assert schema["properties"]["type"] == {"const": cls.type, "description": "The event type's wire name."}
    assert schema["properties"]["version"]["const"] == 1


@pytest.mark.parametrize("event", samples(), ids=lambda event: event.type)
def test_events_built_in_python_meet_their_schema(event: Event) -> None:
    validator(event.type).validate(event.to_dict())


@pytest.mark.parametrize("event", samples(), ids=lambda event: event.type)
def test_wrapped_events_meet_the_envelope_schema(event: Event) -> None:
    validator("envelope").validate(json.loads(wrap(event)))


@pytest.mark.parametrize(
    ("event_type", "changes"),
    [
        pytest.param("backup-due", {"slot": ...}, id="missing-field"),
        pytest.param("export-requested", {"tenant": ...}, id="missing-tenant"),
        pytest.param("backup-due", {"colour": "red"}, id="extra-field"),
        pytest.param("backup-due", {"kind": "weekly"}, id="wrong-enum"),
        pytest.param("account-expired", {"plan": "gold"}, id="wrong-plan"),
        pytest.param("account-expired", {"trial_started_at": ...}, id="trial-without-start"),
        pytest.param("account-expired", {"trial_started_at": None}, id="trial-with-null-start"),
        pytest.param("account-expired", {"plan": "paid"}, id="paid-with-start"),
        pytest.param("backup-due", {"target": "Helpdesk Main"}, id="bad-target"),
        pytest.param("snapshot-due", {"server": "-db"}, id="bad-server"),
        pytest.param("backup-due", {"slot": "2026-11-28T04:00:00"}, id="naive-timestamp"),
        pytest.param("backup-due", {"slot": "28/11/2026 04:00"}, id="unparsable-timestamp"),
        pytest.param("backup-due", {"version": 2}, id="unknown-version"),
        pytest.param("backup-due", {"version": True}, id="bool-version"),
        pytest.param("backup-due", {"type": "snapshot-due"}, id="other-type"),
        pytest.param("backup-due", {"kind": 7}, id="wrong-json-type"),
        pytest.param("backup-due", {"event_id": "not-a-uuid"}, id="bad-uuid"),
        pytest.param("backup-due", {"idempotency_key": "has space"}, id="bad-key"),
        pytest.param("export-requested", {"request_id": "r" * 129}, id="long-request-id"),
        pytest.param("export-requested", {"requested_by": "ann\nbob"}, id="control-character"),
        pytest.param("export-requested", {"requested_by": "x" * 257}, id="long-requested-by"),
        pytest.param("restore-drill", {"slot": ...}, id="drill-missing-slot"),
        pytest.param("restore-drill", {"colour": "red"}, id="drill-extra-field"),
        pytest.param("restore-drill", {"kind": "full"}, id="drill-with-backup-kind"),
        pytest.param("restore-drill", {"target": "Helpdesk Main"}, id="bad-drill-target"),
        pytest.param("restore-drill", {"target": 7}, id="drill-target-not-string"),
        pytest.param("restore-drill", {"slot": "2026-11-29T02:00:00"}, id="drill-naive-slot"),
        pytest.param("restore-drill", {"type": "backup-due"}, id="drill-as-other-type"),
        pytest.param("tenant-restore-requested", {"at": ...}, id="restore-without-moment"),
        pytest.param("tenant-restore-requested", {"mode": "sideways"}, id="restore-bad-mode"),
        pytest.param("tenant-restore-requested", {"force": True}, id="force-side-by-side"),
        pytest.param("tenant-restore-requested", {"force": "yes"}, id="force-not-boolean"),
        pytest.param("tenant-restore-requested", {"mode": "replace", "as_name": "x"}, id="replace-as"),
        pytest.param("tenant-restore-requested", {"as_name": "a; DROP"}, id="as-not-a-name"),
        pytest.param("tenant-restore-requested", {"as_name": "a" * 64}, id="as-too-long"),
    ],
)
def test_payloads_the_decoder_rejects_the_schema_rejects_too(
    event_type: str, changes: dict[str, Any]
) -> None:
    # Given the schema's example with a change that breaks the contract
    (example,) = load_schema(event_type)["examples"]
    payload = {name: value for name, value in {**example, **changes}.items() if value is not ...}
    # Then the decoder and the schema both refuse it
    with pytest.raises(InvalidEvent):
        decode_event(payload)
    assert not validator(event_type).is_valid(payload)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"queue_name": "snapshot"}, "queue of another pool"),
        ({"actor_name": "snapshot_due"}, "actor of another pool"),
        ({"actor_name": "account_expired", "queue_name": "lifecycle"}, "event does not fit the actor"),
        ({"queue_name": "verify"}, "verify queue for a backup actor"),
        ({"actor_name": "restore_drill"}, "verify actor on the backup queue"),
        ({"actor_name": "restore_drill", "queue_name": "verify"}, "backup event for the drill actor"),
        ({"kwargs": {"target": "crm"}}, "kwargs not empty"),
        ({"args": []}, "no event"),
        ({"message_timestamp": "now"}, "timestamp not an integer"),
        ({"priority": 0}, "extra key"),
    ],
)
def test_the_envelope_schema_rejects_misaddressed_or_malformed_messages(
    changes: dict[str, Any], reason: str
) -> None:
    (example,) = load_schema("envelope")["examples"]
    assert not validator("envelope").is_valid({**example, **changes}), reason


def test_the_envelope_schema_knows_every_pool_and_actor() -> None:
    properties = load_schema("envelope")["properties"]
    assert set(properties["queue_name"]["enum"]) == set(EVENT_POOL.values())
    assert set(properties["actor_name"]["enum"]) == {t.replace("-", "_") for t in EVENT_POOL}


names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True)
moments = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC))


@given(target=names, kind=st.sampled_from(["full", "diff", "log"]), slot=moments)
def test_any_valid_backup_due_meets_its_schema(target: str, kind: str, slot: datetime) -> None:
    event = BackupDue.new(target=target, kind=kind, slot=slot)
    validator("backup-due").validate(event.to_dict())


@given(target=names, slot=moments)
def test_any_valid_restore_drill_meets_its_and_the_envelope_schema(target: str, slot: datetime) -> None:
    event = RestoreDrill.new(target=target, slot=slot)
    validator("restore-drill").validate(event.to_dict())
    validator("envelope").validate(json.loads(wrap(event)))


def test_every_outbound_schema_file_is_named_and_loads() -> None:
    from messages.schema_files import OUTBOUND_TYPES, SCHEMA_DIR, load_outbound_schema

    files = sorted(p.name for p in (SCHEMA_DIR / "outbound").glob("*.json"))
    assert files == sorted(f"{name}.v1.schema.json" for name in OUTBOUND_TYPES)
    for name in OUTBOUND_TYPES:
        Draft202012Validator.check_schema(load_outbound_schema(name))
