"""Whether a process still exists, for the pid files of the servers deskvault starts."""

from __future__ import annotations

import os


def process_exists(pid: int) -> bool:
    """True while `pid` names a process, ours or another user's (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as someone else's
    return True
