"""Errors for messages that break the contract; each names the field at fault."""

from __future__ import annotations

from deskvault_core.errors import DeskvaultError


class MessageError(DeskvaultError):
    """A message could not be accepted."""

    exit_code = 2


class _FieldError(MessageError):
    """A message's field broke the contract; `str()` is `field: reason`."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self) -> tuple[type[_FieldError], tuple[str, str]]:
        # Exception pickling replays `args` (the joined text), which would not fit this constructor.
        return (type(self), (self.field, self.reason))


class InvalidEvent(_FieldError):
    """An event's field is missing, unknown, of the wrong type or out of range."""


class InvalidEnvelope(_FieldError):
    """The dramatiq envelope around an event is malformed or addressed to the wrong queue or actor."""
