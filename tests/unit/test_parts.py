"""How a file-level backup is cut into parts, and what each part's plaintext holds."""

from __future__ import annotations

import io
import itertools
import tarfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engines.postgresql import parts
from workers.engines.postgresql.datafiles import DataFile, walk

MIB = 2**20


def test_files_are_grouped_by_database_folder_and_the_rest_is_the_clusters() -> None:
    assert parts.group_of("base/16384/2619") == "base/16384"
    assert parts.group_of("base/16384/2619_fsm") == "base/16384"
    in_tablespace = "pg_tblspc/16500/PG_15_202209061/16384"
    assert parts.group_of(f"{in_tablespace}/16501") == in_tablespace
    assert parts.group_of("global/pg_control") == parts.CLUSTER_GROUP
    assert parts.group_of("PG_VERSION") == parts.CLUSTER_GROUP
    assert parts.group_of("pg_xact/0000") == parts.CLUSTER_GROUP
    assert parts.group_of("base/PG_VERSION_odd") == parts.CLUSTER_GROUP


sizes = st.lists(st.integers(min_value=0, max_value=MIB), min_size=0, max_size=40)


@settings(deadline=None)
@given(sizes, sizes, st.integers(min_value=16 * 1024, max_value=MIB // 2))
def test_every_byte_of_every_file_is_in_exactly_one_part_and_parts_stay_bounded(
    tenant_a: list[int], cluster: list[int], part_bytes: int
) -> None:
    files = [DataFile(f"base/16384/{1000 + i}", n, 0) for i, n in enumerate(tenant_a)]
    files += [DataFile(f"global/{2000 + i}", n, 0) for i, n in enumerate(cluster)]
    planned = parts.plan(files, ["base", "base/16384", "global"], part_bytes=part_bytes)

    assert planned[0].name == parts.FOLDERS_PART and planned[0].folders == ["base", "base/16384", "global"]
    assert len({p.name for p in planned}) == len(planned)
    covered: dict[str, list[tuple[int, int]]] = {}
    for part in planned[1:]:
        assert part.plain_bytes <= part_bytes or (part.slice_of is None and len(part.files) == 1)
        if part.slice_of is not None:
            assert part.group == parts.group_of(part.slice_of.path)
            covered.setdefault(part.slice_of.path, []).append((part.offset, part.length))
        else:
            assert part.files and all(parts.group_of(f.path) == part.group for f in part.files)
            for f in part.files:
                covered.setdefault(f.path, []).append((0, f.size))
    for f in files:
        ranges = sorted(covered.pop(f.path))
        assert ranges[0][0] == 0 and sum(n for _, n in ranges) == f.size
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(ranges))
    assert covered == {}


def test_the_largest_group_is_planned_first() -> None:
    files = [DataFile("base/1/1", 10, 0), DataFile("base/5/1", 1000, 0), DataFile("global/1", 100, 0)]
    planned = parts.plan(files, [], part_bytes=MIB)
    assert [p.group for p in planned[1:]] == ["base/5", parts.CLUSTER_GROUP, "base/1"]


def test_a_tar_part_holds_each_file_at_its_listed_size_though_it_changed_since(tmp_path: Path) -> None:
    (tmp_path / "base" / "1").mkdir(parents=True)
    (tmp_path / "base" / "1" / "grew").write_bytes(b"a" * 5000)  # listed at 3000 bytes
    (tmp_path / "base" / "1" / "shrank").write_bytes(b"b" * 10)  # listed at 100 bytes
    listed = [
        DataFile("base/1/grew", 3000, 0),
        DataFile("base/1/shrank", 100, 0),
        DataFile("base/1/dropped", 700, 0),  # gone since it was listed
    ]
    part = parts.Part("part-00001", "base/1", files=listed)
    with tarfile.open(fileobj=io.BytesIO(b"".join(parts.stream(tmp_path, part)))) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert got == {
        "base/1/grew": b"a" * 3000,
        "base/1/shrank": b"b" * 10 + bytes(90),
        "base/1/dropped": bytes(700),
    }


def test_a_slice_is_the_raw_bytes_of_its_range(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    (tmp_path / "f").write_bytes(data)
    listed = DataFile("f", len(data), 0)
    part = parts.Part("part-00002", parts.CLUSTER_GROUP, slice_of=listed, offset=1000, length=3000)
    assert b"".join(parts.stream(tmp_path, part)) == data[1000:4000]
    past_the_end = parts.Part("part-00003", parts.CLUSTER_GROUP, slice_of=listed, offset=10000, length=500)
    assert b"".join(parts.stream(tmp_path, past_the_end)) == data[10000:] + bytes(500 - len(data[10000:]))


def test_the_walk_lists_what_a_backup_copies_and_keeps_skipped_folders_empty(tmp_path: Path) -> None:
    for folder in ("base/1", "global", "pg_wal/archive_status", "pg_stat_tmp", "base/1/pgsql_tmp"):
        (tmp_path / folder).mkdir(parents=True)
    names = ("PG_VERSION", "postmaster.pid", "base/1/100", "base/1/pg_internal.init", "global/pg_control")
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "pg_wal" / "000000010000000000000001").write_bytes(b"w")
    (tmp_path / "pg_stat_tmp" / "db.stat").write_bytes(b"s")
    (tmp_path / "base" / "1" / "pgsql_tmp" / "t").write_bytes(b"t")

    files, folders = walk(tmp_path)

    assert sorted(f.path for f in files) == ["PG_VERSION", "base/1/100", "global/pg_control"]
    assert set(folders) >= {"base", "base/1", "global", "pg_wal", "pg_wal/archive_status", "pg_stat_tmp"}
    assert "base/1/pgsql_tmp" not in folders


@pytest.mark.parametrize("parallel", [1, 3])
def test_a_failing_part_stops_the_rest_and_is_raised(parallel: int) -> None:
    started: list[int] = []

    def work(n: int) -> int:
        started.append(n)
        if n == 1:
            raise RuntimeError("part 1 failed")
        return n

    stop = threading.Event()
    with pytest.raises(RuntimeError, match="part 1 failed"):
        parts._all_at_once(work, list(range(50)), parallel, "test", stop)
    assert len(started) < 50 and stop.is_set()


names = st.sampled_from([f"base/1/{n}" for n in range(12)] + ["global/1", "PG_VERSION", "pg_wal/x"])
listing = st.dictionaries(names, st.tuples(st.integers(0, 3), st.integers(100, 103)), max_size=15)


@given(listing, listing, st.integers(99, 105))
def test_a_differential_finds_exactly_the_changed_new_and_deleted_files(
    full: dict[str, tuple[int, int]], now: dict[str, tuple[int, int]], full_started: int
) -> None:
    from workers.engines.postgresql.datafiles import skipped
    from workers.engines.postgresql.diff import _compare

    files = [DataFile(p, size, mtime) for p, (size, mtime) in now.items() if not skipped(p)]
    known = iter(sorted((p, size, mtime) for p, (size, mtime) in full.items()))

    changed, deleted = _compare(files, known, full_started)

    expected_changed = {
        f.path for f in files if full.get(f.path) != (f.size, int(f.mtime)) or f.mtime >= full_started - 1
    }
    assert {f.path for f in changed} == expected_changed and len(changed) == len(expected_changed)
    assert deleted == sorted(p for p in full if p not in now and not skipped(p))


def test_a_folder_the_walk_cannot_list_fails_the_backup_naming_it(tmp_path: Path, monkeypatch) -> None:
    import os

    from workers.engines.postgresql.datafiles import UnreadableDataDirectory

    (tmp_path / "base" / "1").mkdir(parents=True)
    (tmp_path / "base" / "1" / "100").write_bytes(b"x")
    real = os.scandir

    def scandir(path):  # what a worker without the server's rights meets (root reads anything)
        if str(path).endswith("base/1"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UnreadableDataDirectory, match=r"base/1.*run it as the server's user"):
        walk(tmp_path)


def test_a_file_the_backup_cannot_read_fails_it_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    import builtins

    from workers.engines.postgresql.datafiles import UnreadableDataDirectory

    (tmp_path / "secret").write_bytes(b"x" * 10)
    real = builtins.open

    def refusing(path, *args, **kwargs):
        if str(path).endswith("secret"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    part = parts.Part("part-00001", parts.CLUSTER_GROUP, files=[DataFile("secret", 10, 0)])
    with pytest.raises(UnreadableDataDirectory, match="secret"):
        b"".join(parts.stream(tmp_path, part))
