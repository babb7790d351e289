"""A failed server start or recovery ends its error with where the server log is and its last lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.engines.postgresql.cluster import LOG_TAIL_LINES, ClusterError, PgCluster, log_report
from workers.engines.postgresql.restore import _recovered

FATAL = "2026-12-03 21:33:37.557 UTC [21114] FATAL:  recovery ended before configured recovery target"


def test_the_report_names_the_log_and_quotes_its_last_lines(tmp_path: Path) -> None:
    log_file = tmp_path / "data.log"
    log_file.write_text("".join(f"line {i}\n" for i in range(100)) + FATAL + "\n")

    report = log_report(log_file)

    assert report.startswith(f"server log {log_file}, last {LOG_TAIL_LINES} lines:\n")
    quoted = report.splitlines()[1:]
    assert len(quoted) == LOG_TAIL_LINES
    assert quoted[0] == "  line 81" and quoted[-1] == f"  {FATAL}"


def test_a_big_log_is_read_from_its_end_only_and_never_quotes_a_cut_line(tmp_path: Path) -> None:
    log_file = tmp_path / "data.log"
    log_file.write_text("x" * 200_000 + "\n" + "".join(f"line {i}\n" for i in range(5)))

    quoted = log_report(log_file).splitlines()[1:]

    assert quoted == [f"  line {i}" for i in range(5)]  # the cut 200,000-character line is left out


def test_a_missing_or_empty_log_is_said_so(tmp_path: Path) -> None:
    assert log_report(tmp_path / "none.log") == (
        f"server log {tmp_path / 'none.log'} could not be read: No such file or directory"
    )
    (tmp_path / "empty.log").touch()
    assert log_report(tmp_path / "empty.log") == f"server log {tmp_path / 'empty.log'} is empty"


class _DiedReplaying(PgCluster):
    """A restored server that exited during replay: psql cannot connect any more."""

    def psql(self, sql: str, dbname: str = "postgres", timeout: float = 600) -> str:
        raise ClusterError(f"psql on port {self.port} (postgres) failed (exit 2): connection refused")


def test_a_server_dying_during_recovery_is_reported_with_its_log(tmp_path: Path) -> None:
    cluster = _DiedReplaying(tmp_path / "data", 1)
    cluster.log_file.write_text(f"LOG:  redo starts at 0/2000028\n{FATAL}\n")

    with pytest.raises(ClusterError) as failed:
        _recovered(cluster)

    message = str(failed.value)
    assert f"recovery in {cluster.datadir} failed" in message and "connection refused" in message
    assert f"server log {tmp_path / 'data.log'}" in message and FATAL in message
