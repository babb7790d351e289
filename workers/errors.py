"""Errors a handler raises; permanent ones send the event to the dead-letter queue without retrying."""

from __future__ import annotations

from deskvault_core.errors import DeskvaultError
from messages.errors import MessageError


class HandlerError(DeskvaultError):
    """A handler could not do its job; dramatiq retries it with backoff."""


class PermanentError(HandlerError):
    """The event can never succeed as sent (unknown target, wrong actor); it is dead-lettered at once."""


class UnknownTarget(PermanentError):
    """The event names a target or server that is not configured."""


# Raised anywhere in handling, these go straight to the dead-letter queue: retrying cannot help.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (MessageError, PermanentError)
