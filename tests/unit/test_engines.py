"""The engine interface itself: the registry, the defaults for missing layers, the log arithmetic."""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from deskvault_core import config
from deskvault_core.config import TargetSettings
from workers.engines.base import Engine, LogArchive, LogFile, NotSupported
from workers.engines.postgresql.walarchive import WalArchive
from workers.engines.postgresql.walnames import Segment, parse_lsn
from workers.engines.registry import ENGINES, engine_for
from workers.errors import PermanentError

TARGET = TargetSettings(name="main", engine="postgresql", conninfo="host=db user=backup")
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def test_the_registry_serves_exactly_the_engines_the_configuration_accepts() -> None:
    assert sorted(ENGINES) == sorted(config.ENGINES)
    for name, cls in ENGINES.items():
        assert cls.name == name
        assert not inspect.isabstract(cls), f"{cls.__name__} leaves {sorted(cls.__abstractmethods__)} open"
        assert cls.dump_format
    assert type(engine_for(TARGET)).name == "postgresql"


class Minimal(Engine):
    """An engine with only what every engine must have: full backups, restores, scratch servers, dumps."""

    name = "minimal"
    dump_format = "none"

    def full_backup(self, repo: Any, **kwargs: Any) -> Any:
        raise AssertionError

    def plan_restore(self, repo: Any, at: Any) -> Any:
        raise AssertionError

    def restore(self, repo: Any, plan: Any, into: Path, **kwargs: Any) -> Any:
        raise AssertionError

    def scratch_server(self, label: str) -> Any:
        return nullcontext()

    def probe(self, server: Any) -> list[str]:
        return []

    def list_databases(self, server: Any = None) -> list[str]:
        return []

    def dump_database(self, database: str, server: Any = None) -> Any:
        return iter(())

    def drop_database(self, database: str) -> bool:
        return False


@pytest.mark.parametrize(
    ("call", "layer"),
    [
        (
            lambda e: e.diff_backup(None, backup_id="b", full={}, job_key="k", event_id="e"),
            "differential backups",
        ),
        (lambda e: e.log_backup(None, backup_id="b", fulls=[], job_key="k", event_id="e"), "log backups"),
        (lambda e: e.log_streamer(None, Path("/nonexistent"), 1.0), "log streaming"),
        (lambda e: e.log_archive(None, []), "log archive"),
    ],
)
def test_a_missing_layer_is_refused_for_good_naming_the_engine_and_the_layer(call: Any, layer: str) -> None:
    with pytest.raises(NotSupported, match=rf"^targets\.main\.engine: minimal has no {layer}$") as raised:
        call(Minimal(TARGET))
    assert isinstance(raised.value, PermanentError)  # dead-lettered at once, never retried


class Numbered(LogArchive):
    def span(self, backup: dict[str, Any]) -> tuple[int, int, int]:
        return backup["timeline"], backup["start"], backup["stop"]

    def name(self, timeline: int, position: int) -> str:
        return f"{timeline}:{position}"


def _archive(*files: tuple[int, int | None, bool]) -> Numbered:
    return Numbered(
        "targets/main/log/",
        [LogFile(f"k{i}", f"f{i}", tl, pos, partial, T0) for i, (tl, pos, partial) in enumerate(files)],
    )


def test_gaps_are_found_within_a_timeline_and_a_partial_file_stands_in_for_the_last_position() -> None:
    archive = _archive(
        (1, 3, False), (1, 4, False), (1, 6, False), (1, 7, True), (2, 9, False), (0, None, False)
    )
    assert archive.first_gap(1, 3, 4) is None
    assert archive.first_gap(1, 3, 6) == 5
    assert archive.first_gap(1, 6, 7) is None  # 7 is being written: its partial file is what exists
    assert archive.first_gap(1, 6, 8) == 7  # ...but only as the last position
    assert archive.first_gap(2, 9, 9) is None
    assert archive.gaps() == ["1:5"]  # between timelines there is no gap to report


def test_the_wal_archive_counts_positions_in_segments_of_the_recorded_size() -> None:
    size = 16 * 1024 * 1024
    full = {"timeline": 3, "start_lsn": "1/2A000028", "stop_lsn": "1/2C000100"}
    archive = WalArchive("main", [], size)
    timeline, start, stop = archive.span(full)
    assert timeline == 3
    assert start == Segment.of(3, parse_lsn(full["start_lsn"]), size).segno
    assert stop == Segment.of(3, parse_lsn(full["stop_lsn"]), size).segno
    assert archive.name(3, start) == "00000003000000010000002A"
    assert archive.prefix == "targets/main/wal/"
