"""Writes on behalf of a job that may have lost its lease: once fenced out, a write raises instead of landing.

The job runner (`workers.jobs`) installs its lease's check around the work; the repository calls it before
every object write and delete, and between the chunks of a streamed upload, so a worker that lost its
lease stops, and its unfinished upload is aborted, before another attempt can take the job over. The check
is captured when a write begins, so threads that read or compress ahead apply the same fence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Check = Callable[[], None]

_current: ContextVar[Check | None] = ContextVar("deskvault_fence", default=None)


def _unfenced() -> None:
    return None


@contextmanager
def fenced(check: Check) -> Iterator[None]:
    """Run the block's repository writes under `check`, which raises once they must stop."""
    token = _current.set(check)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> Check:
    """The fence of the work running in this context (a no-op outside a job)."""
    return _current.get() or _unfenced
