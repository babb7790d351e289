"""The commit index read from real WAL: every commit found with its exact time and xid, and every
record's end where PostgreSQL's replay reports it, also for records that cross a page or a segment."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import commit_times, marks_cluster

from workers.engines.postgresql.cluster import DEFAULT_PG_BIN, PgCluster
from workers.engines.postgresql.commitindex import (
    LONG_PAGE_HEADER,
    RECORD_RE,
    SHORT_PAGE_HEADER,
    XLOG_BLOCK,
    index_file,
    record_end,
)
from workers.engines.postgresql.walnames import Segment, parse_lsn

pytestmark = pytest.mark.integration

SEGMENT_SIZE = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def wal(scratch_dir: Path) -> Iterator[tuple[PgCluster, int, int]]:
    """A cluster that wrote ~3 segments of WAL: single-row commits between bulk inserts."""
    with marks_cluster(scratch_dir, "index", columns="id int PRIMARY KEY, note text") as cluster:
        start = parse_lsn(cluster.psql("SELECT pg_current_wal_insert_lsn()").strip())
        for i in range(1, 41):
            cluster.psql(f"INSERT INTO marks VALUES ({i}, 'single')")
            cluster.psql(
                f"INSERT INTO marks SELECT g, repeat('x', 300) FROM generate_series({i * 100_000}, "
                f"{i * 100_000 + 3_000}) g"
            )
        end = parse_lsn(cluster.psql("SELECT pg_current_wal_insert_lsn()").strip())
        cluster.psql("SELECT pg_switch_wal()")  # no checkpoint here: it would recycle the segments read
        yield cluster, start, end


def _records(cluster: PgCluster, start: int, end: int) -> list[tuple[int, int]]:
    out = subprocess.run(
        [
            str(DEFAULT_PG_BIN / "pg_waldump"),
            "--path",
            str(cluster.datadir / "pg_wal"),
            "--start",
            f"{start >> 32:X}/{start & 0xFFFFFFFF:X}",
            "--end",
            f"{end >> 32:X}/{end & 0xFFFFFFFF:X}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    found = [m for line in out.splitlines() if (m := RECORD_RE.match(line))]
    return [(parse_lsn(m.group(4)), int(m.group(2))) for m in found]


def test_each_record_ends_where_the_next_begins_across_pages_and_segments(wal) -> None:
    cluster, start, end = wal
    records = _records(cluster, start, end)
    assert len(records) > 10_000
    crossed_segment = crossed_page = 0
    for (lsn, total), (next_lsn, _) in itertools.pairwise(records):
        ends = record_end(lsn, total, SEGMENT_SIZE)
        header = LONG_PAGE_HEADER if ends % SEGMENT_SIZE == 0 else SHORT_PAGE_HEADER
        # A record ending on a page boundary is followed by that page's header; otherwise directly.
        assert next_lsn == ends or (ends % XLOG_BLOCK == 0 and next_lsn == ends + header), (lsn, total)
        crossed_page += lsn // XLOG_BLOCK != (ends - 1) // XLOG_BLOCK
        crossed_segment += lsn // SEGMENT_SIZE != (ends - 1) // SEGMENT_SIZE
    assert crossed_segment >= 2 and crossed_page > 100  # the cases that count pages were met


def test_the_index_of_each_segment_lists_every_commit_with_its_exact_time(wal, tmp_path) -> None:
    cluster, start, end = wal
    expected = commit_times(cluster)
    rows = cluster.psql("SELECT id, xmin FROM marks WHERE id <= 40").splitlines()
    xids = {int(i): int(x) for i, x in (r.split("|") for r in rows)}
    indexed = {}
    for segno in range(start // SEGMENT_SIZE, end // SEGMENT_SIZE + 1):
        segment = Segment(1, segno)
        path, following = (
            Path(shutil.copy(found, tmp_path))
            if (found := cluster.datadir / "pg_wal" / s.name(SEGMENT_SIZE)).exists()
            else None
            for s in (segment, Segment(1, segno + 1))
        )
        assert path is not None
        index = index_file(DEFAULT_PG_BIN, path, segment, SEGMENT_SIZE, following)
        assert index.complete
        indexed.update({c.xid: c for c in index.commits})
    for row in range(1, 41):  # the single-row transactions, spread over the segments
        commit = indexed[xids[row]]
        assert commit.at == expected[row]
        assert start <= commit.lsn < commit.end <= end
