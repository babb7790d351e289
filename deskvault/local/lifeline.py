"""`deskvault up`'s children stop when up does, even when up itself is killed (kill -9, the OOM killer):
a pool left running would go on taking the broker's events with no one left to stop it.

Linux sends a process a signal of its choosing when its parent ends (prctl PR_SET_PDEATHSIG); each
child asks for SIGTERM, its graceful stop, as its first step. Elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "DESKVAULT_STOP_WITH_PID"
PR_SET_PDEATHSIG = 1


def env_for_children() -> dict[str, str]:
    """The environment for a child that must stop with this process."""
    return {**os.environ, PARENT_ENV: str(os.getpid())}


def hold() -> None:
    """In a child of up: be sent SIGTERM when up ends. The variable is removed so that the child's own
    children (a pool's worker processes, which their pool stops) do not take up's PID for their parent."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # not granted: up's own stop still reaches this process
    if os.getppid() != int(parent):  # up ended before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
