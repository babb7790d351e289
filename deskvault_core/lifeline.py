"""A child process stops when its parent does, even when the parent is killed outright (kill -9, the OOM
killer): a pool process left running would go on taking the broker's events with no one to stop it.

Linux sends a process a signal of its choosing when its parent ends (prctl PR_SET_PDEATHSIG); the child
asks for SIGTERM, its graceful stop, as its first step. Used by `deskvault up` for the processes it runs,
by `deskvault worker` for its worker processes, and, through `stopping_with_me`, for a program that cannot
ask itself (pg_receivewal: left behind by a killed streamer, it holds the slot the next one needs).
The request survives exec. Elsewhere than Linux this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence

PARENT_ENV = "DESKVAULT_STOP_WITH_PID"
PR_SET_PDEATHSIG = 1


def env_for_children() -> dict[str, str]:
    """The environment for a child command that must stop with this process (see `hold`)."""
    return {**os.environ, PARENT_ENV: str(os.getpid())}


def stopping_with_me(command: Sequence[str]) -> list[str]:
    """`command` run so that it stops when this process ends: a small Python step asks for the signal,
    then becomes the program (exec, the same PID). No preexec_fn: unsafe in a process with threads."""
    return [sys.executable, "-m", "deskvault_core.lifeline", str(os.getpid()), *command]


def hold() -> None:
    """In a command started with `env_for_children`: stop with that parent. The variable is removed so
    that the command's own children (a pool's worker processes) do not take its parent for theirs."""
    parent = os.environ.pop(PARENT_ENV, "")
    if parent.isdigit():
        stop_with(int(parent))


def stop_with(parent: int) -> None:
    """Be sent SIGTERM when the process `parent` (this one's parent) ends."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # not granted: the parent's own stop still reaches this process
    if os.getppid() != parent:  # the parent ended before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":  # python -m deskvault_core.lifeline PARENT_PID PROGRAM ARGS...
    stop_with(int(sys.argv[1]))
    os.execv(sys.argv[2], sys.argv[2:])
