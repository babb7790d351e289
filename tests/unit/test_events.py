"""Events round-trip, and decode_event rejects every kind of bad input with InvalidEvent naming the field."""

from __future__ import annotations

import json
import pickle
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from messages import (
    EVENT_CLASSES,
    AccountExpired,
    AccountReactivated,
    BackupDue,
    Event,
    ExportRequested,
    InvalidEvent,
    PurgeDue,
    RestoreDrill,
    SnapshotDue,
    TenantRestoreRequested,
    build_event,
    decode_event,
    event_fields,
)
from messages.events import MAX_IDEMPOTENCY_KEY
from messages.topology import EVENT_POOL

SLOT = datetime(2026, 11, 28, 4, 0, tzinfo=UTC)
EVENT_ID = "0b6f3c1e-8f0a-4c1d-9a57-2d1e9c4b7a10"


def sample(event_type: str) -> Event:
    """A valid event of each type, with every optional field filled."""
    fixed: dict[str, Any] = {"event_id": EVENT_ID, "occurred_at": SLOT + timedelta(seconds=2)}
    if event_type == "backup-due":
        return BackupDue.new(target="helpdesk_main", kind="full", slot=SLOT, **fixed)
    if event_type == "snapshot-due":
        return SnapshotDue.new(server="db-eu-1.internal", slot=SLOT, **fixed)
    if event_type == "account-expired":
        trial_start = SLOT - timedelta(days=14)
        return AccountExpired.new(
            tenant="acme", plan="trial", expired_at=SLOT, trial_started_at=trial_start, **fixed
        )
    if event_type == "account-reactivated":
        return AccountReactivated.new(tenant="acme", **fixed)
    if event_type == "restore-drill":
        return RestoreDrill.new(target="helpdesk_main", slot=SLOT, **fixed)
    if event_type == "purge-due":
        return PurgeDue.new(tenant="acme", purge_after=SLOT, **fixed)
    if event_type == "tenant-restore-requested":  # as_name only side by side, force only replacing
        return TenantRestoreRequested.new(
            tenant="acme", at=SLOT, request_id="R-7", requested_by="ann", mode="replace", force=True, **fixed
        )
    return ExportRequested.new(
        tenant="acme", request_id="EXP-42", requested_by="Zoë <z@acme.example>", as_of=SLOT, **fixed
    )


def wire(event_type: str, **changes: Any) -> dict[str, Any]:
    """The sample event's JSON form with fields replaced; a change to `...` removes the field."""
    payload = sample(event_type).to_dict()
    for name, value in changes.items():
        if value is ...:
            del payload[name]
        else:
            payload[name] = value
    return payload


def rejected(data: Any) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(data)
    return caught.value


# Round trips


@pytest.mark.parametrize("event_type", list(EVENT_CLASSES))
def test_every_event_type_round_trips_through_dict_text_and_bytes(event_type: str) -> None:
    # Given a valid event
    event = sample(event_type)
    # When it is encoded each way and decoded again
    as_dict = event.to_dict()
    as_text = json.dumps(as_dict)
    # Then it comes back equal, and its wire form names its type and version
    assert decode_event(as_dict) == event
    assert decode_event(as_text) == event
    assert decode_event(as_text.encode()) == event
    assert (as_dict["type"], as_dict["version"]) == (event_type, 1)
    assert type(event) is EVENT_CLASSES[event_type]


def test_event_classes_cover_every_routed_event_type() -> None:
    assert set(EVENT_CLASSES) == set(EVENT_POOL)


@pytest.mark.parametrize(
    ("event", "name"),
    [
        (ExportRequested.new(tenant="acme", request_id="r1", requested_by="ann"), "as_of"),
        (AccountExpired.new(tenant="acme", plan="paid", expired_at=SLOT), "trial_started_at"),
    ],
)
def test_absent_optionals_are_written_as_null_and_read_back(event: Event, name: str) -> None:
    # Given an event built without its optional timestamp
    # When it is turned into a dict
    payload = event.to_dict()
    # Then the field is present as null, and a payload without it at all decodes to the same event
    assert payload[name] is None
    del payload[name]
    assert decode_event(payload) == event


def test_timestamps_are_written_in_utc_with_z_and_microseconds_only_when_set() -> None:
    # Given slots with and without microseconds, one in another zone
    plain = BackupDue.new(target="a", kind="log", slot=SLOT)
    precise = BackupDue.new(target="a", kind="log", slot=datetime(2026, 11, 28, 5, 0, 0, 250, tzinfo=UTC))
    elsewhere = BackupDue.new(
        target="a", kind="log", slot=datetime(2026, 11, 28, 5, tzinfo=timezone(timedelta(hours=1)))
    )
    # Then each is written in UTC with Z
    assert plain.to_dict()["slot"] == "2026-11-28T04:00:00Z"
    assert precise.to_dict()["slot"] == "2026-11-28T05:00:00.000250Z"
    assert elsewhere.to_dict()["slot"] == "2026-11-28T04:00:00Z"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28T04:00:00Z", SLOT),
        ("2026-11-28t04:00:00z", SLOT),
        ("2026-11-28T04:00:00+00:00", SLOT),
        ("2026-11-28T05:30:00+01:30", SLOT),
        ("2026-11-27T23:00:00-05:00", SLOT),
        ("2026-11-28T04:00:00.5Z", SLOT.replace(microsecond=500000)),
        ("2026-11-28T04:00:00.123456789Z", SLOT.replace(microsecond=123456)),
    ],
)
def test_timestamps_with_any_explicit_offset_are_read_as_utc(text: str, expected: datetime) -> None:
    event = decode_event(wire("backup-due", slot=text))
    assert isinstance(event, BackupDue)
    assert event.slot == expected
    assert event.slot.utcoffset() == timedelta(0)


def test_event_id_is_read_in_lowercase() -> None:
    event = decode_event(wire("backup-due", event_id=EVENT_ID.upper()))
    assert event.event_id == EVENT_ID


# Rejections: each names its field


def _missing_cases() -> list[Any]:
    cases = []
    for event_type, cls in EVENT_CLASSES.items():
        for name in ("version", "event_id", "idempotency_key", "occurred_at", *event_fields(event_type)):
            if not cls.__dataclass_fields__[name].metadata["spec"].optional:
                cases.append(
                    pytest.param(wire(event_type, **{name: ...}), name, id=f"{event_type}-no-{name}")
                )
    return cases


@pytest.mark.parametrize(("payload", "field"), _missing_cases())
def test_a_missing_required_field_is_named(payload: dict[str, Any], field: str) -> None:
    error = rejected(payload)
    assert (error.field, error.reason) == (field, "missing required field")


@pytest.mark.parametrize("event_type", list(EVENT_CLASSES))
def test_an_unknown_field_is_named(event_type: str) -> None:
    error = rejected(wire(event_type, colour="red"))
    assert error.field == "colour"
    assert event_type in error.reason


@pytest.mark.parametrize(
    ("event_type", "field", "value", "reason"),
    [
        ("backup-due", "kind", 7, "expected string, got integer"),
        ("backup-due", "kind", None, "expected string, got null"),
        ("backup-due", "target", ["a"], "expected string, got array"),
        ("backup-due", "slot", 1795838400, "expected string, got integer"),
        ("backup-due", "version", True, "expected integer, got boolean"),
        ("backup-due", "version", "1", "expected integer, got string"),
        ("backup-due", "version", 1.0, "expected integer, got number"),
        ("snapshot-due", "server", {"name": "db"}, "expected string, got object"),
        ("account-expired", "trial_started_at", False, "expected string, got boolean"),
        ("export-requested", "as_of", 0, "expected string, got integer"),
        ("export-requested", "event_id", 1, "expected string, got integer"),
        ("restore-drill", "target", 7, "expected string, got integer"),
        ("restore-drill", "slot", None, "expected string, got null"),
        ("restore-drill", "slot", 1795838400, "expected string, got integer"),
    ],
)
def test_a_value_of_the_wrong_json_type_is_named(
    event_type: str, field: str, value: Any, reason: str
) -> None:
    error = rejected(wire(event_type, **{field: value}))
    assert (error.field, error.reason) == (field, reason)


@pytest.mark.parametrize(
    ("event_type", "field", "value"),
    [
        ("backup-due", "event_id", "not-a-uuid"),
        ("backup-due", "event_id", EVENT_ID.replace("-", "")),
        ("backup-due", "event_id", "{" + EVENT_ID + "}"),
        ("backup-due", "idempotency_key", ""),
        ("backup-due", "idempotency_key", "has space"),
        ("backup-due", "idempotency_key", "k" * (MAX_IDEMPOTENCY_KEY + 1)),
        ("backup-due", "idempotency_key", "clé"),
        ("backup-due", "target", "Helpdesk"),
        ("backup-due", "target", "-leading-dash"),
        ("backup-due", "target", ""),
        ("backup-due", "target", "a" * 64),
        ("backup-due", "target", "crm\n"),
        ("backup-due", "target", "crm٣"),
        ("backup-due", "kind", "weekly"),
        ("backup-due", "kind", "FULL"),
        ("backup-due", "slot", "2026-11-28T04:00:00"),
        ("backup-due", "slot", "yesterday"),
        ("backup-due", "slot", "2026-02-30T04:00:00Z"),
        ("backup-due", "slot", "2026-11-28T24:00:00Z"),
        ("backup-due", "slot", "2026-11-28T04:00:00+24:00"),
        ("backup-due", "slot", "2026-11-28"),
        ("backup-due", "slot", "0001-01-01T00:00:00+01:00"),
        ("backup-due", "occurred_at", "2026-11-28 04:00:00Z"),
        ("snapshot-due", "server", "db eu"),
        ("snapshot-due", "server", ".hidden"),
        ("snapshot-due", "server", "s" * 129),
        ("account-expired", "tenant", "ACME"),
        ("account-expired", "plan", "enterprise"),
        ("account-reactivated", "tenant", "acme corp"),
        ("export-requested", "request_id", "has space"),
        ("export-requested", "request_id", "r" * 129),
        ("export-requested", "requested_by", ""),
        ("export-requested", "requested_by", "ann\nbob"),
        ("export-requested", "requested_by", "x" * 257),
        ("export-requested", "requested_by", "\ud800"),
        ("export-requested", "as_of", "2026-11-28T04:00:00"),
        ("restore-drill", "target", "Helpdesk"),
        ("restore-drill", "target", "-leading-dash"),
        ("restore-drill", "target", "a" * 64),
        ("restore-drill", "slot", "2026-11-28T04:00:00"),
        ("restore-drill", "slot", "2026-02-30T04:00:00Z"),
    ],
)
def test_a_value_that_breaks_its_rule_is_named(event_type: str, field: str, value: str) -> None:
    assert rejected(wire(event_type, **{field: value})).field == field


def test_a_bad_value_is_explained() -> None:
    error = rejected(wire("backup-due", kind="weekly"))
    assert str(error) == "kind: must be one of full, diff, log; got 'weekly'"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("2026-11-28T04:00:00", "no UTC offset"),
        ("tomorrow", "RFC 3339"),
        ("2026-13-01T00:00:00Z", "not a valid"),
    ],
)
def test_a_bad_timestamp_says_what_is_wrong(text: str, words: str) -> None:
    error = rejected(wire("backup-due", slot=text))
    assert error.field == "slot"
    assert words in error.reason


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"plan": "trial", "trial_started_at": None}, "required when plan is trial"),
        ({"plan": "trial", "trial_started_at": ...}, "required when plan is trial"),
        (
            {"plan": "paid", "trial_started_at": "2026-11-01T00:00:00Z"},
            "must be absent or null when plan is paid",
        ),
        ({"trial_started_at": "2026-11-28T04:00:01Z"}, "is after expired_at"),
    ],
)
def test_the_trial_rules_name_trial_started_at(changes: dict[str, Any], reason: str) -> None:
    error = rejected(wire("account-expired", **changes))
    assert error.field == "trial_started_at"
    assert reason in error.reason


def test_a_trial_may_start_the_moment_it_expires() -> None:
    event = decode_event(wire("account-expired", trial_started_at="2026-11-28T04:00:00Z"))
    assert isinstance(event, AccountExpired)


@pytest.mark.parametrize(
    ("type_value", "reason"),
    [
        (..., "missing required field"),
        ("weekly-report", "unknown event type"),
        (3, "expected string, got integer"),
    ],
)
def test_a_missing_or_unknown_type_is_named(type_value: Any, reason: str) -> None:
    error = rejected(wire("backup-due", type=type_value))
    assert error.field == "type"
    assert reason in error.reason


def test_an_unknown_type_lists_the_known_ones() -> None:
    error = rejected(wire("backup-due", type="weekly-report"))
    assert all(event_type in error.reason for event_type in EVENT_CLASSES)


def test_an_unknown_version_says_which_one_is_understood() -> None:
    error = rejected(wire("backup-due", version=2))
    assert str(error) == "version: unsupported version 2 for backup-due; this worker understands 1"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"type": "weekly-report", "version": 2, "kind": 7}, "type"),
        ({"version": 2, "kind": 7, "slot": ...}, "version"),
        ({"version": True, "colour": "red"}, "version"),
    ],
)
def test_type_is_checked_before_version_and_version_before_fields(
    changes: dict[str, Any], field: str
) -> None:
    assert rejected(wire("backup-due", **changes)).field == field


def _huge(extra_bytes: int) -> dict[str, Any]:
    """A backup-due payload whose compact JSON is exactly 65536 + extra_bytes bytes long."""
    payload = wire("backup-due")
    payload["idempotency_key"] = ""
    size = len(json.dumps(payload, separators=(",", ":")).encode())
    payload["idempotency_key"] = "k" * (65536 + extra_bytes - size)
    return payload


def test_a_payload_of_exactly_the_limit_is_read_past_the_size_check() -> None:
    # The over-long key fails its own rule, which shows the size check let the payload through.
    assert rejected(_huge(0)).field == "idempotency_key"


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda payload: json.dumps(payload, separators=(",", ":")).encode(), id="bytes"),
        pytest.param(lambda payload: json.dumps(payload, separators=(",", ":")), id="text"),
        pytest.param(lambda payload: payload, id="dict"),
    ],
)
def test_a_payload_over_the_limit_is_rejected_as_a_whole(encode: Any) -> None:
    error = rejected(encode(_huge(1)))
    assert error.field == "(payload)"
    assert "65537 bytes exceeds the 65536-byte limit" in error.reason


def test_a_dict_is_measured_in_utf8_bytes_not_characters() -> None:
    # Given a dict whose JSON is under the limit in characters but over it in UTF-8 bytes
    payload = _huge(0)
    payload["idempotency_key"] = "é" * (len(payload["idempotency_key"]) // 2 + 1)
    # Then it is rejected for its size
    assert rejected(payload).field == "(payload)"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"type": "backup-due\xff"}', id="invalid-utf8"),
        pytest.param(b"\xfe\xff\x00{", id="utf16-bom"),
        pytest.param('{"type": "back', id="truncated-json"),
        pytest.param(b"", id="empty"),
        pytest.param("[]", id="array"),
        pytest.param(b"3", id="number"),
        pytest.param("null", id="null"),
        pytest.param('"backup-due"', id="string"),
        pytest.param('{"type": "backup-due", "type": "snapshot-due"}', id="duplicate-key"),
        pytest.param('{"type": "backup-due", "version": NaN}', id="nan"),
        pytest.param("[" * 30000 + "]" * 30000, id="deeply-nested"),
        pytest.param("\ud800", id="lone-surrogate-text"),
        pytest.param({"type": "backup-due", "slot": SLOT}, id="dict-with-datetime"),
        pytest.param({"type": "backup-due", "version": float("nan")}, id="dict-with-nan"),
        pytest.param(42, id="not-json-input"),
    ],
)
def test_a_payload_that_is_not_a_json_object_is_rejected_as_a_whole(data: Any) -> None:
    assert rejected(data).field == "(payload)"


def test_errors_show_field_and_reason_carry_exit_code_2_and_survive_pickling() -> None:
    error = InvalidEvent("payload.kind", "must be one of full, diff, log; got 'weekly'")
    assert str(error) == "payload.kind: must be one of full, diff, log; got 'weekly'"
    assert error.exit_code == 2
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.field, copy.reason, str(copy)) == (error.field, error.reason, str(error))


# Building events


@pytest.mark.parametrize(
    ("event", "key"),
    [
        (
            BackupDue.new(target="crm", kind="diff", slot=SLOT.replace(second=59)),
            "backup-due:crm:diff:2026-11-28T04:00Z",
        ),
        (SnapshotDue.new(server="db-1", slot=SLOT), "snapshot-due:db-1:2026-11-28T04:00Z"),
        (
            AccountExpired.new(tenant="acme", plan="paid", expired_at=SLOT),
            "account-expired:acme:2026-11-28T04:00:00Z",
        ),
        (
            AccountReactivated.new(tenant="acme", occurred_at=SLOT),
            "account-reactivated:acme:2026-11-28T04:00:00Z",
        ),
        (
            ExportRequested.new(tenant="acme", request_id="EXP-1", requested_by="ann"),
            "export-requested:acme:EXP-1",
        ),
        (
            RestoreDrill.new(target="crm", slot=SLOT.replace(second=59)),
            "restore-drill:crm:2026-11-28T04:00Z",
        ),
        (
            RestoreDrill.new(target="crm", slot=SLOT.astimezone(timezone(timedelta(hours=1)))),
            "restore-drill:crm:2026-11-28T04:00Z",
        ),
    ],
)
def test_new_derives_the_idempotency_key_from_the_business_fields(event: Event, key: str) -> None:
    assert event.idempotency_key == key


def test_new_fills_a_fresh_event_id_and_the_current_time() -> None:
    # When the same fact is built twice
    before = datetime.now(UTC)
    first, second = (BackupDue.new(target="crm", kind="log", slot=SLOT) for _ in range(2))
    # Then the ids differ, the idempotency keys agree and occurred_at is now
    assert first.event_id != second.event_id
    assert first.idempotency_key == second.idempotency_key
    assert before <= first.occurred_at <= datetime.now(UTC)


def test_new_keeps_a_given_idempotency_key() -> None:
    event = SnapshotDue.new(server="db-1", slot=SLOT, idempotency_key="manual-run-7")
    assert event.idempotency_key == "manual-run-7"


def test_an_overlong_default_key_is_shortened_deterministically() -> None:
    # Given an export whose natural key would exceed the limit
    def build() -> ExportRequested:
        return ExportRequested.new(tenant="t" * 63, request_id="r" * 128, requested_by="ann")

    # Then the key fits, keeps its head, and is the same every time
    key = build().idempotency_key
    assert len(key) == MAX_IDEMPOTENCY_KEY
    assert key.startswith("export-requested:ttt")
    assert build().idempotency_key == key


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: BackupDue.new(target="Bad Name", kind="full", slot=SLOT), "target"),
        (lambda: BackupDue.new(target="crm", kind="full", slot=datetime(2026, 11, 28)), "slot"),
        (lambda: BackupDue.new(target="crm", kind="full", slot=1795838400), "slot"),  # type: ignore[arg-type]
        (lambda: BackupDue.new(target="crm", kind="full", slot=SLOT, event_id="x"), "event_id"),
        (lambda: SnapshotDue.new(server="db 1", slot=SLOT), "server"),
        (lambda: AccountExpired.new(tenant="acme", plan="trial", expired_at=SLOT), "trial_started_at"),
        (lambda: ExportRequested.new(tenant="acme", request_id="r", requested_by="\t"), "requested_by"),
        (lambda: AccountReactivated.new(tenant="acme", idempotency_key=""), "idempotency_key"),
        (lambda: RestoreDrill.new(target="Bad Name", slot=SLOT), "target"),
        (lambda: RestoreDrill.new(target="crm", slot=datetime(2026, 11, 28)), "slot"),
    ],
)
def test_new_never_builds_an_invalid_event(build: Any, field: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        build()
    assert caught.value.field == field


def test_event_fields_lists_what_a_producer_supplies() -> None:
    specs = event_fields("export-requested")
    assert list(specs) == ["tenant", "request_id", "requested_by", "as_of", "kind"]
    assert [spec.kind for spec in specs.values()] == ["text", "text", "text", "timestamp", "text"]
    assert [spec.optional for spec in specs.values()] == [False, False, False, True, True]


def test_event_fields_lists_a_restore_drills_target_and_slot() -> None:
    specs = event_fields("restore-drill")
    assert list(specs) == ["target", "slot"]
    assert [spec.kind for spec in specs.values()] == ["text", "timestamp"]
    assert not any(spec.optional for spec in specs.values())


def test_build_event_reads_command_line_text() -> None:
    # Given flag values as a command line gives them
    values = {
        "tenant": "acme",
        "request-id": "EXP-9",
        "requested-by": "ann",
        "as-of": "2026-11-28T05:00:00+01:00",
    }
    # When an event is built from them
    event = build_event("export-requested", values)
    # Then the fields are typed and the defaults filled in
    assert isinstance(event, ExportRequested)
    assert event.as_of == SLOT
    assert event.idempotency_key == "export-requested:acme:EXP-9"


def test_build_event_builds_a_restore_drill_with_the_default_key() -> None:
    event = build_event("restore-drill", {"target": "crm", "slot": "2026-11-28T05:00:30+01:00"})
    assert isinstance(event, RestoreDrill)
    assert event.slot == SLOT.replace(second=30)
    assert event.idempotency_key == "restore-drill:crm:2026-11-28T04:00Z"


def test_build_event_accepts_the_common_fields_and_leaves_optionals_out() -> None:
    values = {"tenant": "acme", "request_id": "EXP-9", "requested_by": "ann", "idempotency-key": "k1"}
    event = build_event("export-requested", values)
    assert isinstance(event, ExportRequested)
    assert (event.idempotency_key, event.as_of) == ("k1", None)


@pytest.mark.parametrize(
    ("event_type", "values", "field"),
    [
        ("weekly-report", {}, "type"),
        ("backup-due", {"target": "crm", "kind": "full"}, "slot"),
        ("backup-due", {"target": "crm", "kind": "full", "slot": "2026-11-28T04:00"}, "slot"),
        ("backup-due", {"target": "crm", "kind": "full", "slot": "2026-11-28T04:00:00"}, "slot"),
        ("backup-due", {"target": "crm", "kind": "hourly", "slot": "2026-11-28T04:00:00Z"}, "kind"),
        (
            "backup-due",
            {"target": "crm", "kind": "full", "slot": "2026-11-28T04:00:00Z", "colour": "red"},
            "colour",
        ),
        (
            "backup-due",
            {"target": "crm", "kind": "full", "slot": "2026-11-28T04:00:00Z", "version": "2"},
            "version",
        ),
        (
            "export-requested",
            {"tenant": "acme", "request_id": "r", "requested_by": "a", "as-of": ""},
            "as_of",
        ),
        ("restore-drill", {"target": "crm"}, "slot"),
        ("restore-drill", {"target": "crm", "slot": "2026-11-28T04:00:00Z", "kind": "full"}, "kind"),
    ],
)
def test_build_event_names_the_bad_flag(event_type: str, values: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        build_event(event_type, values)
    assert caught.value.field == field


# Properties

names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True)
offsets = st.timedeltas(
    min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)
)
moments = st.datetimes(
    timezones=st.builds(
        timezone, offsets.map(lambda delta: delta // timedelta(minutes=1) * timedelta(minutes=1))
    )
)


@given(target=names, kind=st.sampled_from(["full", "diff", "log"]), slot=moments, occurred_at=moments)
def test_any_valid_backup_due_round_trips(
    target: str, kind: str, slot: datetime, occurred_at: datetime
) -> None:
    try:
        event = BackupDue.new(target=target, kind=kind, slot=slot, occurred_at=occurred_at)
    except InvalidEvent as error:
        # Only a moment that cannot be expressed in UTC (the calendar's very edges) may be refused.
        assert error.field in ("slot", "occurred_at")
        return
    assert decode_event(event.to_dict()) == event
    assert decode_event(json.dumps(event.to_dict())) == event


@given(target=names, slot=moments, occurred_at=moments)
def test_any_valid_restore_drill_round_trips(target: str, slot: datetime, occurred_at: datetime) -> None:
    try:
        event = RestoreDrill.new(target=target, slot=slot, occurred_at=occurred_at)
    except InvalidEvent as error:
        # Only a moment that cannot be expressed in UTC (the calendar's very edges) may be refused.
        assert error.field in ("slot", "occurred_at")
        return
    assert decode_event(event.to_dict()) == event
    assert decode_event(json.dumps(event.to_dict())) == event


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)
field_names = st.sampled_from(
    [
        "type",
        "version",
        "event_id",
        "idempotency_key",
        "occurred_at",
        "target",
        "kind",
        "slot",
        "server",
        "tenant",
        "plan",
        "expired_at",
        "trial_started_at",
        "request_id",
        "requested_by",
        "as_of",
    ]
) | st.text(max_size=10)
plausible = st.sampled_from(
    [
        *EVENT_CLASSES,
        1,
        2,
        True,
        EVENT_ID,
        "2026-11-28T04:00:00Z",
        "2026-11-28T04:00:00",
        "acme",
        "full",
        "trial",
        "paid",
    ]
)


@given(st.dictionaries(field_names, plausible | json_values, max_size=16))
def test_junk_dicts_raise_nothing_but_invalid_event(junk: dict[str, Any]) -> None:
    try:
        decode_event(junk)
    except InvalidEvent:
        pass


@given(st.dictionaries(field_names, plausible | json_values, max_size=16))
def test_junk_json_text_raises_nothing_but_invalid_event(junk: dict[str, Any]) -> None:
    try:
        decode_event(json.dumps(junk))
    except InvalidEvent:
        pass


@given(st.binary(max_size=200))
def test_junk_bytes_raise_nothing_but_invalid_event(junk: bytes) -> None:
    try:
        decode_event(junk)
    except InvalidEvent:
        pass
