"""`deskvault backups verify`: read back every object of a target and check the chain for gaps.

Every object is downloaded and decrypted in full: AES-GCM's tags prove each frame, the final frame proves
nothing was cut off, and the manifests' SHA-256 and sizes prove each data object is the one recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from deskvault_core.config import TargetSettings
from workers.engines.registry import engine_for
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
    repo: ObjectRepository, target: TargetSettings, on_progress: Callable[[int, int], None] | None = None
) -> Report:
    checks: list[tuple[str, str | None, int | None]] = []  # key, expected sha256, expected size
    problems: list[Problem] = []
    manifests = []
    for key in repo.list_keys(f"targets/{target.name}/backups/"):
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
    archive = engine_for(target).log_archive(repo, fulls)
    checks += [(f.key, None, None) for f in archive.files]

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
    if fulls and archive.files:
        timeline, start, _ = archive.span(fulls[0])
        end = max(f.position for f in archive.files if f.position is not None and f.timeline == timeline)
        if (gap := archive.first_gap(timeline, start, end)) is not None:
            problems.append(
                Problem(
                    archive.prefix + archive.name(timeline, gap), "missing: the log archive has a gap here"
                )
            )
    return Report(len(checks) + len(manifests), plain, tuple(problems))
