"""A child of `deskvault up` stops when up is killed outright, and its own children are not tied to up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import process_alive

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

CHILD = textwrap.dedent(
    """
    import os, sys, time
    from deskvault_core import lifeline
    lifeline.hold()
    print(os.getpid(), os.environ.get(lifeline.PARENT_ENV, "unset"), flush=True)
    time.sleep(60)
    """
)
PARENT = textwrap.dedent(
    f"""
    import subprocess, sys, time
    from deskvault_core import lifeline
    child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], env=lifeline.env_for_children())
    time.sleep(60)
    """
)


def test_a_child_stops_when_its_parent_is_killed_and_does_not_pass_the_tie_on(tmp_path: Path) -> None:
    out = tmp_path / "child.out"
    with out.open("w") as sink:
        parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=sink)
    try:
        deadline = time.monotonic() + 20
        while not out.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid, inherited = out.read_text().split()
        assert inherited == "unset"  # the child's children would not take up's PID for their parent
        assert process_alive(int(pid))

        # When the parent is killed outright
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)

        # Then the child is told to stop, and does
        deadline = time.monotonic() + 10
        while process_alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(int(pid))
    finally:
        if parent.poll() is None:
            parent.kill()
        if out.read_text().split():
            try:
                os.kill(int(out.read_text().split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
