"""Schema version 1 of deskvault's events, and `decode_event`, the one place that trusts nothing.

Build events with `<Class>.new(...)` or `build_event`, read them with `decode_event`: all three run the same
checks, so any event they return is valid. `messages/schemas/` states the same rules, with field descriptions.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar, Self

from .errors import InvalidEvent

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 65536
MAX_IDEMPOTENCY_KEY = 200
PAYLOAD = "(payload)"  # the field path for problems with the payload as a whole
COMMON_FIELDS = ("version", "event_id", "idempotency_key", "occurred_at")

_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})?"
)


def shown(value: object) -> str:
    """`repr(value)`, cut short so a hostile payload cannot flood the logs through an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, as error messages show it."""
    # bool before int: True is an int to Python but not to JSON.
    names = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (dict, "object"))
    for python_type, name in (*names, ((list, tuple), "array")):
        if isinstance(value, python_type):
            return name
    return "null" if value is None else type(value).__name__


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 timestamp with an explicit offset, converted to UTC; ValueError says what is wrong."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise ValueError(f"expected an RFC 3339 timestamp such as 2026-11-28T04:00:00Z; got {shown(text)}")
    *parts, fraction, offset = match.groups()
    if offset is None:
        raise ValueError(f"timestamp {shown(text)} has no UTC offset; add Z or +00:00")
    # RFC 3339 allows any number of fraction digits; Python keeps microseconds.
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        zone = UTC if offset in ("Z", "z") else _zone(offset)
        return datetime(*map(int, parts), micros, tzinfo=zone).astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(f"{shown(text)} is not a valid date and time") from None


def _zone(offset: str) -> timezone:
    hours, minutes = int(offset[1:3]), int(offset[4:6])
    if hours > 23 or minutes > 59:
        raise ValueError(offset)
    sign = -1 if offset[0] == "-" else 1
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def format_timestamp(moment: datetime) -> str:
    """`2026-11-28T04:00:00Z`, with microseconds only when there are some."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"


@dataclass(frozen=True)
class FieldSpec:
    """How a field travels: `kind` is text, timestamp (RFC 3339 text), integer or boolean; `optional`
    allows null."""

    kind: str
    check: Callable[[Any], Any]
    optional: bool = False

    @property
    def json_type(self) -> str:
        return self.kind if self.kind in ("integer", "boolean") else "string"

    def parse(self, name: str, value: object) -> Any:
        """The Python value for a decoded JSON value; InvalidEvent names `name` if it breaks the rules."""
        if value is None and self.optional:
            return None
        if json_type(value) != self.json_type:
            raise InvalidEvent(name, f"expected {self.json_type}, got {json_type(value)}")
        try:
            return self.check(value)
        except ValueError as error:
            raise InvalidEvent(name, str(error)) from None


def _matching(pattern: str, rule: str) -> Callable[[str], str]:
    compiled = re.compile(pattern)

    def check(text: str) -> str:
        if compiled.fullmatch(text) is None:
            raise ValueError(f"must be {rule}; got {shown(text)}")
        return text

    return check


def _one_of(*choices: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {shown(text)}")
        return text

    return check


_uuid = _matching("[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", "a UUID")


def _rule(kind: str, check: Callable[[Any], Any], *, optional: bool = False) -> dict[str, FieldSpec]:
    """Dataclass field metadata carrying the field's wire rules."""
    return {"spec": FieldSpec(kind, check, optional)}


_VERSION = _rule("integer", int)
_EVENT_ID = _rule("text", lambda text: _uuid(text).lower())
_KEY = _rule("text", _matching("[!-~]{1,200}", "1-200 printable ASCII characters without whitespace"))
_AT = _rule("timestamp", parse_timestamp)
_MAYBE_AT = _rule("timestamp", parse_timestamp, optional=True)
_NAME = _rule("text", _matching("[a-z0-9][a-z0-9_-]{0,62}", "1-63 of a-z 0-9 _ -, starting alphanumeric"))
_SERVER = _rule(
    "text", _matching("[A-Za-z0-9][A-Za-z0-9._-]{0,127}", "1-128 of A-Z a-z 0-9 . _ -, starting alphanumeric")
)
_KIND = _rule("text", _one_of("full", "diff", "log"))
_PLAN = _rule("text", _one_of("trial", "paid"))
_EXPORT_KIND = _rule("text", _one_of("on-request", "scheduled"), optional=True)
_REQUEST_ID = _rule("text", _matching("[!-~]{1,128}", "1-128 printable ASCII characters without whitespace"))
_RESTORE_MODE = _rule("text", _one_of("side-by-side", "replace"), optional=True)
# A name PostgreSQL takes without quoting surprises: letters, digits, _ and $ (and -, as tenants use).
_DATABASE = _rule(
    "text",
    _matching("[A-Za-z_][A-Za-z0-9_$-]{0,62}", "1-63 of A-Z a-z 0-9 _ $ -, starting with a letter or _"),
    optional=True,
)
_FLAG = _rule("boolean", lambda value: value, optional=True)
# Printable: no control characters or line breaks; lone surrogates are refused as they cannot be UTF-8.
_PERSON = _rule(
    "text", _matching("[^\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]{1,256}", "1-256 printable characters")
)


@dataclass(frozen=True, kw_only=True)
class Event:
    """Fields every event carries; obtain events from a subclass's `new`, `build_event` or `decode_event`."""

    type: ClassVar[str]

    version: int = field(metadata=_VERSION)
    event_id: str = field(metadata=_EVENT_ID)
    idempotency_key: str = field(metadata=_KEY)
    occurred_at: datetime = field(metadata=_AT)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form, `type` first; timestamps as RFC 3339 text and absent optionals as null."""
        out: dict[str, Any] = {"type": self.type}
        for spec in fields(self):
            value = getattr(self, spec.name)
            out[spec.name] = format_timestamp(value) if isinstance(value, datetime) else value
        return out

    def default_idempotency_key(self) -> str:
        """The key `new` uses when none is given: it names the business fact, so re-publishing dedupes."""
        raise NotImplementedError

    def _check_together(self) -> None:
        """Rules that span fields; each field's own rules have already passed."""

    @classmethod
    def _create(
        cls,
        own: Mapping[str, Any],
        idempotency_key: str | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> Self:
        """A new event of this type, checked by a round trip through `decode_event`."""
        wire = {
            "type": cls.type,
            "version": SCHEMA_VERSION,
            "event_id": str(uuid.uuid4()) if event_id is None else event_id,
            "idempotency_key": "-" if idempotency_key is None else idempotency_key,
            "occurred_at": _to_wire(datetime.now(UTC) if occurred_at is None else occurred_at),
            **{name: _to_wire(value) for name, value in own.items()},
        }
        event = decode_event(wire)
        if idempotency_key is None:
            # The default key is derived only from fields that have just passed their checks.
            wire["idempotency_key"] = _bounded(event.default_idempotency_key())
            event = decode_event(wire)
        assert isinstance(event, cls)
        return event


def _to_wire(value: object) -> object:
    """A `new` argument as it would travel; anything odd is left for `decode_event` to name and reject."""
    if not isinstance(value, datetime):
        return value
    try:
        return value.isoformat() if value.utcoffset() is None else format_timestamp(value)
    except OverflowError:
        # Out of range in UTC: sent with its own offset, so the decoder names the field.
        return value.isoformat()


def _bounded(key: str) -> str:
    """A default key within the limit; an over-long one keeps its head and a digest of the whole."""
    if len(key) <= MAX_IDEMPOTENCY_KEY:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{key[: MAX_IDEMPOTENCY_KEY - len(digest) - 1]}~{digest}"


def _minute(moment: datetime) -> str:
    return format_timestamp(moment)[:16] + "Z"


@dataclass(frozen=True, kw_only=True)
class BackupDue(Event):
    """A database is due for a full, differential or log backup for a schedule slot."""

    type: ClassVar[str] = "backup-due"

    target: str = field(metadata=_NAME)
    kind: str = field(metadata=_KIND)
    slot: datetime = field(metadata=_AT)

    @classmethod
    def new(
        cls,
        *,
        target: str,
        kind: str,
        slot: datetime,
        idempotency_key: str | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> BackupDue:
        """A valid backup-due event; by default one idempotency key per target, kind and minute slot."""
        own = {"target": target, "kind": kind, "slot": slot}
        return cls._create(own, idempotency_key, occurred_at, event_id)

    def default_idempotency_key(self) -> str:
        return f"backup-due:{self.target}:{self.kind}:{_minute(self.slot)}"


@dataclass(frozen=True, kw_only=True)
class SnapshotDue(Event):
    """A database server is due for a storage snapshot for a schedule slot."""

    type: ClassVar[str] = "snapshot-due"

    server: str = field(metadata=_SERVER)
    slot: datetime = field(metadata=_AT)

    @classmethod
    def new(
        cls,
        *,
        server: str,
        slot: datetime,
        idempotency_key: str | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> SnapshotDue:
        """A valid snapshot-due event; by default one idempotency key per server and minute slot."""
        return cls._create({"server": server, "slot": slot}, idempotency_key, occurred_at, event_id)

    def default_idempotency_key(self) -> str:
        return f"snapshot-due:{self.server}:{_minute(self.slot)}"


@dataclass(frozen=True, kw_only=True)
class AccountExpired(Event):
    """A tenant's trial or paid plan has expired."""

    type: ClassVar[str] = "account-expired"

    tenant: str = field(metadata=_NAME)
    plan: str = field(metadata=_PLAN)
    expired_at: datetime = field(metadata=_AT)
    trial_started_at: datetime | None = field(default=None, metadata=_MAYBE_AT)

    @classmethod
    def new(
        cls,
        *,
        tenant: str,
        plan: str,
        expired_at: datetime,
        trial_started_at: datetime | None = None,
        idempotency_key: str | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> AccountExpired:
        """A valid account-expired event; by default one idempotency key per tenant and expiry."""
        own = {"tenant": tenant, "plan": plan, "expired_at": expired_at, "trial_started_at": trial_started_at}
        return cls._create(own, idempotency_key, occurred_at, event_id)

    def default_idempotency_key(self) -> str:
        return f"account-expired:{self.tenant}:{format_timestamp(self.expired_at)}"

    def _check_together(self) -> None:
        started = self.trial_started_at
        if self.plan == "trial" and started is None:
            raise InvalidEvent("trial_started_at", "required when plan is trial")
        if self.plan == "paid" and started is not None:
            raise InvalidEvent("trial_started_at", "must be absent or null when plan is paid")
        if started is not None and started > self.expired_at:
            ended = format_timestamp(self.expired_at)
            raise InvalidEvent("trial_started_at", f"{format_timestamp(started)} is after expired_at {ended}")


@dataclass(frozen=True, kw_only=True)
class AccountReactivated(Event):
    """A tenant's expired account is active again."""

    type: ClassVar[str] = "account-reactivated"

    tenant: str = field(metadata=_NAME)

    @classmethod
    def new(
        cls,
        *,
        tenant: str,
        idempotency_key: str | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> AccountReactivated:
        """A valid account-reactivated event; by default one idempotency key per tenant and moment."""
        return cls._create({"tenant": tenant}, idempotency_key, occurred_at, event_id)

    def default_idempotency_key(self) -> str:
        return f"account-reactivated:{self.tenant}:{format_timestamp(self.occurred_at)}"


@dataclass(frozen=True, kw_only=True)
class ExportRequested(Event):
    """Someone asked for an export of a tenant's data, optionally as of a point in time."""

    type: ClassVar[str] = "export-requested"

    tenant: str = field(metadata=_NAME)
    request_id: str = field(metadata=_REQUEST_ID)
    requested_by: str = field(metadata=_PERSON)
    as_of: datetime | None = field(default=None, metadata=_MAYBE_AT)
    # "scheduled" for the nightly downloadable backups deskvault's scheduler requests; absent: on request.
    kind: str | None = field(default=None, metadata=_EXPORT_KIND)

    @classmethod
    def new(
        cls,
        *,
        tenant: str,
        request_id: str,
        requested_by: str,
        as_of: datetime | None = None,
        kind: str | None = None,
        idempotency_key: str | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> ExportRequested:
        """A valid export-requested event; by default one idempotency key per tenant and request id."""
        own = {"tenant": tenant, "request_id": request_id, "requested_by": requested_by, "as_of": as_of}
        if kind is not None:
            own["kind"] = kind
        return cls._create(own, idempotency_key, occurred_at, event_id)

    def default_idempotency_key(self) -> str:
        return f"export-requested:{self.tenant}:{self.request_id}"


@dataclass(frozen=True, kw_only=True)
class TenantRestoreRequested(Event):
    """Someone asked for a tenant's database as of a moment, on its live target: beside the current one
    (under a new name) or in its place."""

    type: ClassVar[str] = "tenant-restore-requested"

    tenant: str = field(metadata=_NAME)
    at: datetime = field(metadata=_AT)
    request_id: str = field(metadata=_REQUEST_ID)
    requested_by: str = field(metadata=_PERSON)
    # side-by-side (absent or null) or replace
    mode: str | None = field(default=None, metadata=_RESTORE_MODE)
    # side by side: the new database's name; absent: <database>_restored_<YYYYMMDDTHHMMSSZ>
    as_name: str | None = field(default=None, metadata=_DATABASE)
    # replace: terminate the sessions connected to the tenant's database
    force: bool | None = field(default=None, metadata=_FLAG)

    @classmethod
    def new(
        cls,
        *,
        tenant: str,
        at: datetime,
        request_id: str,
        requested_by: str,
        mode: str | None = None,
        as_name: str | None = None,
        force: bool | None = None,
        idempotency_key: str | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> TenantRestoreRequested:
        """A valid tenant-restore-requested event; by default one idempotency key per tenant and request."""
        own: dict[str, Any] = {"tenant": tenant, "at": at, "request_id": request_id}
        own["requested_by"] = requested_by
        for name, value in (("mode", mode), ("as_name", as_name), ("force", force)):
            if value is not None:
                own[name] = value
        return cls._create(own, idempotency_key, occurred_at, event_id)

    def default_idempotency_key(self) -> str:
        return f"tenant-restore-requested:{self.tenant}:{self.request_id}"

    def _check_together(self) -> None:
        if self.mode == "replace" and self.as_name is not None:
            raise InvalidEvent("as_name", "must be absent or null when mode is replace (it keeps its name)")
        if self.force and self.mode != "replace":
            raise InvalidEvent("force", "only applies when mode is replace")


@dataclass(frozen=True, kw_only=True)
class RestoreDrill(Event):
    """A database is due for a restore drill (restore a moment of it, check the copy) for a schedule slot."""

    type: ClassVar[str] = "restore-drill"

    target: str = field(metadata=_NAME)
    slot: datetime = field(metadata=_AT)

    @classmethod
    def new(
        cls,
        *,
        target: str,
        slot: datetime,
        idempotency_key: str | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> RestoreDrill:
        """A valid restore-drill event; by default one idempotency key per target and minute slot."""
        return cls._create({"target": target, "slot": slot}, idempotency_key, occurred_at, event_id)

    def default_idempotency_key(self) -> str:
        return f"restore-drill:{self.target}:{_minute(self.slot)}"


@dataclass(frozen=True, kw_only=True)
class PurgeDue(Event):
    """An expired tenant's retention window has passed: its data is to be deleted for good."""

    type: ClassVar[str] = "purge-due"

    tenant: str = field(metadata=_NAME)
    purge_after: datetime = field(metadata=_AT)

    @classmethod
    def new(
        cls,
        *,
        tenant: str,
        purge_after: datetime,
        idempotency_key: str | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> PurgeDue:
        """A valid purge-due event; by default one idempotency key per tenant and purge date."""
        own = {"tenant": tenant, "purge_after": purge_after}
        return cls._create(own, idempotency_key, occurred_at, event_id)

    def default_idempotency_key(self) -> str:
        return f"purge-due:{self.tenant}:{format_timestamp(self.purge_after)}"


EVENT_CLASSES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        BackupDue,
        SnapshotDue,
        AccountExpired,
        AccountReactivated,
        ExportRequested,
        TenantRestoreRequested,
        RestoreDrill,
        PurgeDue,
    )
}


def _specs(cls: type[Event]) -> dict[str, FieldSpec]:
    return {f.name: f.metadata["spec"] for f in fields(cls)}


def _event_class(event_type: object) -> type[Event]:
    if not isinstance(event_type, str):
        raise InvalidEvent("type", f"expected string, got {json_type(event_type)}")
    cls = EVENT_CLASSES.get(event_type)
    if cls is None:
        known = ", ".join(EVENT_CLASSES)
        raise InvalidEvent("type", f"unknown event type {shown(event_type)}; known types: {known}")
    return cls


def event_fields(event_type: str) -> dict[str, FieldSpec]:
    """The fields a producer supplies for an event type, in order; `new` fills in the common ones."""
    specs = _specs(_event_class(event_type))
    return {name: spec for name, spec in specs.items() if name not in COMMON_FIELDS}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which duplicate wins, so such a payload means different things to different readers.
    decoded = dict(pairs)
    if len(decoded) < len(pairs):
        duplicate = next(key for key in decoded if sum(key == k for k, _ in pairs) > 1)
        raise ValueError(f"duplicate key {shown(duplicate)}")
    return decoded


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _check_size(size: int) -> None:
    if size > MAX_EVENT_BYTES:
        raise InvalidEvent(PAYLOAD, f"payload of {size} bytes exceeds the {MAX_EVENT_BYTES}-byte limit")


def _load(data: object) -> object:
    """The decoded JSON value of a payload within the size limit."""
    if isinstance(data, dict):
        try:
            compact = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as error:
            raise InvalidEvent(PAYLOAD, f"not representable as JSON: {error}") from None
        _check_size(len(compact.encode("utf-8", "surrogatepass")))
        return data
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidEvent(PAYLOAD, "text cannot be encoded as UTF-8") from None
    elif isinstance(data, bytes | bytearray):
        raw = bytes(data)
    else:
        raise InvalidEvent(PAYLOAD, f"expected JSON bytes, text or a dict, got {type(data).__name__}")
    _check_size(len(raw))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidEvent(PAYLOAD, f"not valid UTF-8 at byte {error.start}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:
        raise InvalidEvent(PAYLOAD, f"not valid JSON: {error}") from None


def decode_event(data: bytes | str | dict[str, Any]) -> Event:
    """The event in untrusted input, checked as type, version, then fields; InvalidEvent names the field."""
    payload = _load(data)
    if not isinstance(payload, dict):
        raise InvalidEvent(PAYLOAD, f"expected a JSON object, got {json_type(payload)}")
    if "type" not in payload:
        raise InvalidEvent("type", "missing required field")
    cls = _event_class(payload["type"])
    if "version" not in payload:
        raise InvalidEvent("version", "missing required field")
    version = payload["version"]
    if json_type(version) != "integer":
        raise InvalidEvent("version", f"expected integer, got {json_type(version)}")
    if version != SCHEMA_VERSION:
        supported = f"this worker understands {SCHEMA_VERSION}"
        raise InvalidEvent("version", f"unsupported version {shown(version)} for {cls.type}; {supported}")
    specs = _specs(cls)
    for name, spec in specs.items():
        if name not in payload and not spec.optional:
            raise InvalidEvent(name, "missing required field")
    for name in payload:
        if name != "type" and name not in specs:
            raise InvalidEvent(str(name), f"unknown field for {cls.type}")
    event = cls(**{name: spec.parse(name, payload.get(name)) for name, spec in specs.items()})
    event._check_together()
    return event


def _from_text(spec: FieldSpec, name: str, text: str) -> object:
    """A command-line value as it would travel: true/false for a boolean field, text otherwise."""
    if spec.kind != "boolean":
        return text
    if text.lower() not in ("true", "false"):
        raise InvalidEvent(name, f"expected true or false; got {shown(text)}")
    return text.lower() == "true"


def build_event(event_type: str, values: Mapping[str, str]) -> Event:
    """An event from command-line text (`as-of` or `as_of`; timestamps in RFC 3339), defaults as in `new`."""
    cls = _event_class(event_type)
    specs = _specs(cls)
    own: dict[str, Any] = {}
    common: dict[str, Any] = {}
    for given, text in values.items():
        name = given.replace("-", "_")
        if name not in specs or name == "version":
            raise InvalidEvent(name, f"unknown field for {cls.type}")
        value = specs[name].parse(name, _from_text(specs[name], name, text))
        (common if name in COMMON_FIELDS else own)[name] = value
    return cls._create(own, **common)
