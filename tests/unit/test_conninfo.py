"""A target's password is taken out of the conninfo that goes on a command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.engines.postgresql.conninfo import libpq_env, split_password, with_dbname


@pytest.mark.parametrize(
    ("conninfo", "rest", "password"),
    [
        ("host=db port=5432 user=backup", "host=db port=5432 user=backup", None),
        ("host=db password=s3cret user=backup", "host=db user=backup", "s3cret"),
        ("password = 's3 cr\\'et' host=db", "host=db", "s3 cr'et"),
        ("host=db user=backup password=x", "host=db user=backup", "x"),
        ("postgresql://backup:p%40ss@db:5432/postgres", "postgresql://backup@db:5432/postgres", "p@ss"),
        ("postgresql://backup@db/postgres", "postgresql://backup@db/postgres", None),
    ],
)
def test_split_password(conninfo: str, rest: str, password: str | None) -> None:
    assert split_password(conninfo) == (rest, password)


def test_the_password_travels_in_the_environment() -> None:
    assert libpq_env("pw")["PGPASSWORD"] == "pw"
    assert "PATH" in libpq_env(None)


def test_the_backup_command_line_carries_no_password() -> None:
    from deskvault_core.config import TargetSettings
    from workers.engines.postgresql.basebackup import basebackup_command
    from workers.engines.postgresql.server import PgServer

    engine = PgServer(
        TargetSettings(name="main", engine="postgresql", conninfo="host=db user=backup password=s3cret")
    )
    command = basebackup_command(engine, "20261122T010000Z-full", Path("/spool/tars"))
    assert not any("s3cret" in arg for arg in command)
    assert "host=db user=backup" in command
    assert engine.env["PGPASSWORD"] == "s3cret"


def test_odbc_connection_string_names_the_same_server() -> None:
    from workers.engines.postgresql.conninfo import odbc_connection_string

    odbc = odbc_connection_string("host=127.0.0.1 port=55432 user=postgres dbname=postgres password=p}w")
    assert odbc == (
        "DRIVER={PostgreSQL Unicode};SERVER=127.0.0.1;PORT=55432;DATABASE=postgres;UID=postgres;PWD={p}}w};"
    )
    assert "SERVER=db;PORT=6543;DATABASE=app;UID=u" in odbc_connection_string("postgresql://u@db:6543/app")


def test_with_dbname_overrides_the_database_of_either_form() -> None:
    keyword = with_dbname("host=db1 dbname=postgres user=u", "o'brien")
    assert keyword == "host=db1 dbname=postgres user=u dbname='o\\'brien'"  # the later dbname wins
    assert with_dbname("postgresql://u@db1:5432/postgres?sslmode=require", "acme db") == (
        "postgresql://u@db1:5432/acme%20db?sslmode=require"
    )
