"""Where a restore puts each tablespace: the mapping, the default beside the data directory, the map file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers.engines.postgresql.tablespaces import TablespaceMappingError, layout, link, listed, parse_map

FULL = {"tablespaces": [{"oid": 16384, "name": "outside", "location": "/srv/ts", "key": "k"}]}


def test_by_default_a_tablespace_goes_beside_the_data_directory(tmp_path: Path) -> None:
    (space,) = layout([FULL], tmp_path / "restored")
    assert space.into == tmp_path / "restored.tablespaces" / "16384"
    assert space.describe() == "tablespace outside (oid 16384, was /srv/ts)"


@pytest.mark.parametrize("key", ["16384", "outside", "/srv/ts"])
def test_a_tablespace_is_mapped_by_oid_name_or_old_location(tmp_path: Path, key: str) -> None:
    (space,) = layout([FULL], tmp_path / "restored", {key: tmp_path / "elsewhere"})
    assert space.into == tmp_path / "elsewhere"


def test_a_mapping_that_names_no_tablespace_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TablespaceMappingError, match=r"--tablespace typo: no such tablespace.*outside"):
        layout([FULL], tmp_path / "restored", {"typo": tmp_path / "x"})


def test_a_tablespace_created_after_the_full_comes_from_the_differential(tmp_path: Path) -> None:
    diff = {"tablespaces": [*FULL["tablespaces"], {"oid": 16390, "name": "later", "location": "/srv/l"}]}
    assert [s.oid for s in layout([FULL, diff], tmp_path / "r")] == [16384, 16390]


def test_old_manifests_have_no_tablespaces_or_only_a_map() -> None:
    assert listed({"objects": []}) == []
    assert listed({"tablespace_map": "16384 /srv/a\\\\b\n"}) == [
        {"oid": 16384, "name": "16384", "location": "/srv/a\\b"}
    ]


def test_the_links_and_the_map_name_the_new_folders(tmp_path: Path) -> None:
    into = tmp_path / "restored"
    into.mkdir()
    (into / "tablespace_map").write_text("16384 /srv/ts\n")
    spaces = layout([FULL], into, {"outside": tmp_path / "new\nline"})

    link(into, spaces)

    assert os.readlink(into / "pg_tblspc" / "16384") == str(tmp_path / "new\nline")
    assert parse_map((into / "tablespace_map").read_text()) == [(16384, str(tmp_path / "new\nline"))]
