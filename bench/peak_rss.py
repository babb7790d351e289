"""Peak memory of a command and everything it starts, for benchmarks that compare tools' footprints.

Run as a wrapper (`python bench/peak_rss.py OUT.json -- COMMAND...`): it runs COMMAND, passes SIGTERM and
SIGINT on to it, and once it exits writes {"returncode", "max_rss_kib"} to OUT.json, where max_rss_kib
is getrusage(RUSAGE_CHILDREN).ru_maxrss of this fresh process: the peak RSS of the largest single
process of COMMAND's tree that was waited for (a daemon it leaves running, such as a PostgreSQL server
started by pg_ctl, is not). `Measured` starts such a wrapper and, meanwhile, samples the sum of VmRSS over
the tree from /proc (PostgreSQL's own processes left out), for tools that work in several processes.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
# Server processes a command may start and leave behind; they are PostgreSQL's memory, not the tool's.
NOT_THE_TOOL = {"postgres", "postmaster"}


class Measured:
    """A command running under the wrapper, its process tree's memory sampled every `interval` s."""

    def __init__(self, command: list[str], out: Path, *, interval: float = 0.2, **popen) -> None:
        self.out = out
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(HERE), str(out), "--", *command], **popen)
        self._tree_peak_kib = 0
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._sampler.start()

    def _sample(self, interval: float) -> None:
        while not self._done.is_set():
            total = sum(_rss_kib(pid) for pid in _descendants(self.proc.pid))
            self._tree_peak_kib = max(self._tree_peak_kib, total)
            self._done.wait(interval)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._done.set()
            self._sampler.join(timeout=5)
        return code

    def peaks_mib(self) -> dict[str, float]:
        """After `wait`: the largest process's peak RSS, and the sampled peak of the tree's sum."""
        doc = json.loads(self.out.read_text())
        # A command that ended before the first sample saw its tree has no sampled figure.
        tree = round(self._tree_peak_kib / 1024, 1) if self._tree_peak_kib else None
        return {"peak_rss_mib": round(doc["max_rss_kib"] / 1024, 1), "tree_peak_rss_mib": tree}


def _descendants(root: int) -> list[int]:
    """The wrapper's descendants (not the wrapper itself), found through every process's parent pid."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name in NOT_THE_TOOL:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _wrap(argv: list[str]) -> int:
    out, separator, *command = argv
    if separator != "--" or not command:
        print("usage: peak_rss.py OUT.json -- COMMAND...", file=sys.stderr)
        return 2
    child = subprocess.Popen(command)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _f: child.send_signal(s))
    code = child.wait()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    Path(out).write_text(json.dumps({"returncode": code, "max_rss_kib": peak}))
    return code


if __name__ == "__main__":
    sys.exit(_wrap(sys.argv[1:]))
