"""What a restore of one database keeps, and how it reads what replay passed over."""

from __future__ import annotations

import pytest

from deskvault_core.errors import DeskvaultError
from workers.engines.postgresql.subset import DatabaseSubset, check_replayed, subset_for

FULL = {
    "backup_id": "f",
    "layout": "parts",
    "databases": [
        {"oid": 1, "name": "template1", "tablespace": 1663},
        {"oid": 4, "name": "template0", "tablespace": 1663},
        {"oid": 5, "name": "postgres", "tablespace": 1663},
        {"oid": 16384, "name": "acme", "tablespace": 1663},
        {"oid": 16385, "name": "globex", "tablespace": 1663},
    ],
}


def test_it_keeps_the_database_postgres_and_the_cluster_and_nothing_else() -> None:
    subset = subset_for([FULL, None], "acme")
    assert isinstance(subset, DatabaseSubset) and subset.oids == {5, 16384}
    assert not subset.keeps("base/1") and not subset.keeps("base/4")  # the templates: nothing reads them
    assert subset.keeps("cluster") and subset.keeps("pg_wal") and subset.keeps("base/16384")
    assert subset.keeps("pg_tblspc/16390/PG_15_202209061/16384")
    assert not subset.keeps("base/16385") and not subset.keeps("pg_tblspc/16390/PG_15_202209061/16385")


def test_a_database_made_again_between_full_and_differential_keeps_both_oids() -> None:
    diff = {**FULL, "backup_id": "d", "databases": [*FULL["databases"][:3], {"oid": 16400, "name": "acme"}]}
    subset = subset_for([FULL, diff], "acme")
    assert isinstance(subset, DatabaseSubset) and {16384, 16400} <= subset.oids


@pytest.mark.parametrize(
    ("backup", "why"),
    [
        ({"backup_id": "old", "layout": "parts"}, "does not list its databases"),
        ({"backup_id": "tar", "databases": []}, "one archive"),
    ],
)
def test_a_backup_that_cannot_be_split_says_why(backup, why) -> None:
    found = subset_for([backup], "acme")
    assert isinstance(found, str) and why in found


def test_invalid_pages_are_passed_over_only_in_databases_left_out(tmp_path) -> None:
    subset = DatabaseSubset(frozenset({1, 4, 5, 16384}))
    log = tmp_path / "server.log"
    log.write_text(
        "LOG:  redo starts at 0/8000028\n"
        "WARNING:  page 0 of relation base/16385/16497 is uninitialized\n"
        "WARNING:  page 7 of relation pg_tblspc/16390/PG_15_202209061/16385/16500 does not exist\n"
    )
    assert check_replayed(log, subset) == 2
    with log.open("a") as f:
        f.write("WARNING:  page 3 of relation base/16384/16401 does not exist\n")
    with pytest.raises(DeskvaultError, match="base/16384/16401, a file this restore laid out"):
        check_replayed(log, subset)
    log.write_text("WARNING:  page 3 of relation global/1262 is uninitialized\n")
    with pytest.raises(DeskvaultError, match="global/1262"):
        check_replayed(log, subset)
