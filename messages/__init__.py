"""The contract between producers and workers: events, their dramatiq envelope, and the rules for both."""

from __future__ import annotations

from .envelope import MAX_MESSAGE_BYTES, check_envelope, wrap
from .errors import InvalidEnvelope, InvalidEvent, MessageError
from .events import (
    EVENT_CLASSES,
    AccountExpired,
    AccountReactivated,
    BackupDue,
    Event,
    ExportRequested,
    FieldSpec,
    PurgeDue,
    RestoreDrill,
    SnapshotDue,
    TenantRestoreRequested,
    build_event,
    decode_event,
    event_fields,
)

__all__ = [
    "EVENT_CLASSES",
    "MAX_MESSAGE_BYTES",
    "AccountExpired",
    "AccountReactivated",
    "BackupDue",
    "Event",
    "ExportRequested",
    "FieldSpec",
    "InvalidEnvelope",
    "InvalidEvent",
    "MessageError",
    "PurgeDue",
    "RestoreDrill",
    "SnapshotDue",
    "TenantRestoreRequested",
    "build_event",
    "check_envelope",
    "decode_event",
    "event_fields",
    "wrap",
]
