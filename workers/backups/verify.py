"""`deskvault backups verify`: read back every object of a target and check the chain for gaps.

Every object is downloaded and decrypted in full: AES-GCM's tags prove each frame, the final frame proves
nothing was cut off, and the manifests' SHA-256 and sizes prove each data object is the one recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from workers.engines.postgresql.walarchive import first_gap, list_wal
from workers.engines.postgresql.walnames import DEFAULT_SEGMENT_SIZE, Segment, parse_lsn
from workers.repository import catalog
from workers.repository.errors import RepositoryError
from workers.repository.objects import ObjectRepository

THREADS = 4


@dataclass(frozen=True)
class Problem:
    key: str
    detail: str


@dataclass(frozen=True)
class Report:
    objects: int
    plain_bytes: int
    problems: tuple[Problem, ...]


def verify(
    repo: ObjectRepository, target: str, on_progress: Callable[[int, int], None] | None = None
) -> Report:
    checks: list[tuple[str, str | None, int | None]] = []  # key, expected sha256, expected size
    problems: list[Problem] = []
    manifests = []
    for key in repo.list_keys(f"targets/{target}/backups/"):
        if key.endswith("/" + catalog.MANIFEST_NAME):
            try:
                manifests.append(repo.get_json(key))
            except RepositoryError as e:
                problems.append(Problem(key, str(e)))
    for m in manifests:
        checks += [(o["key"], o["sha256"], o["plain_size"]) for o in m.get("objects", [])]
        if m.get("file_list"):
            checks.append((m["file_list"], None, None))
    fulls = sorted((m for m in manifests if m["kind"] == "full"), key=lambda m: m["finished_at"])
    segment_size = (fulls[-1].get("wal_segment_size") if fulls else None) or DEFAULT_SEGMENT_SIZE
    wal = list_wal(repo, target, segment_size)
    checks += [(e.key, None, None) for e in wal]

    def check(item: tuple[str, str | None, int | None]) -> tuple[int, Problem | None]:
        key, sha256, size = item
        total = 0
        try:
            for chunk in repo.get_stream(key, expect_sha256=sha256, expect_size=size):
                total += len(chunk)
        except RepositoryError as e:
            return total, Problem(key, str(e))
        return total, None

    plain = 0
    with ThreadPoolExecutor(THREADS) as pool:
        for done, (size, problem) in enumerate(pool.map(check, checks), start=1):
            plain += size
            if problem is not None:
                problems.append(problem)
            if on_progress is not None:
                on_progress(done, len(checks))
    if fulls and wal:
        start = Segment.of(fulls[0]["timeline"], parse_lsn(fulls[0]["start_lsn"]), segment_size)
        end = max(e.segment for e in wal if e.segment is not None and e.segment.timeline == start.timeline)
        if (gap := first_gap(wal, start, end)) is not None:
            problems.append(
                Problem(
                    f"targets/{target}/wal/{gap.name(segment_size)}",
                    "missing: the WAL archive has a gap here",
                )
            )
    return Report(len(checks) + len(manifests), plain, tuple(problems))
