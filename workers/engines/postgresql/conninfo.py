"""Keep a target's password out of process arguments: libpq tools get it through PGPASSWORD instead.

A password inside a conninfo passed as `-d` would be visible to every user of the machine (`ps`), and
in any error that echoes the command line.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

# key = value, where value is a bare word or a single-quoted string with backslash escapes (libpq's rules)
_KEYWORD_PASSWORD = re.compile(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def split_password(conninfo: str) -> tuple[str, str | None]:
    """`(conninfo without its password, the password or None)`, for keyword or URI conninfos."""
    if conninfo.startswith(("postgresql://", "postgres://")):
        return _split_uri(conninfo)
    match = _KEYWORD_PASSWORD.search(conninfo)
    if match is None:
        return conninfo, None
    value = match.group(1)
    if value.startswith("'"):
        value = re.sub(r"\\(.)", r"\1", value[1:-1])
    rest = (conninfo[: match.start()] + " " + conninfo[match.end() :]).strip()
    return " ".join(rest.split()), value


def _split_uri(uri: str) -> tuple[str, str | None]:
    parts = urlsplit(uri)
    if parts.password is None:
        return uri, None
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.netloc.rsplit("@", 1)[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}")), unquote(parts.password)


def with_dbname(conninfo: str, dbname: str) -> str:
    """The same server and role, connected to database `dbname` instead."""
    if conninfo.startswith(("postgresql://", "postgres://")):
        return urlunsplit(urlsplit(conninfo)._replace(path="/" + quote(dbname, safe="")))
    # In a keyword conninfo a later keyword wins; the value is quoted by libpq's rules.
    escaped = dbname.replace("\\", "\\\\").replace("'", "\\'")
    return f"{conninfo} dbname='{escaped}'"


def as_replication(conninfo: str) -> str:
    """The same server and role over a physical replication connection (what pg_receivewal opens)."""
    if conninfo.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(conninfo)
        query = f"{parts.query}&replication=true" if parts.query else "replication=true"
        return urlunsplit(parts._replace(query=query))
    return f"{conninfo} replication=true"


def libpq_env(password: str | None) -> dict[str, str]:
    """The environment for a libpq tool: ours, plus PGPASSWORD when the conninfo carried a password."""
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password
    return env


# libpq keyword -> psqlODBC keyword, for the settings the low-level backup session needs.
_ODBC_KEYS = {
    "host": "SERVER",
    "hostaddr": "SERVER",
    "port": "PORT",
    "user": "UID",
    "dbname": "DATABASE",
    "sslmode": "SSLMode",
}


def odbc_connection_string(conninfo: str) -> str:
    """The same server through psqlODBC (used where one session must span several statements)."""
    rest, password = split_password(conninfo)
    if rest.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(rest)
        values = {
            "host": parts.hostname or "",
            "port": str(parts.port or 5432),
            "user": parts.username or "",
            "dbname": parts.path.lstrip("/") or "postgres",
        }
    else:
        values = dict(_keyword_pairs(rest))
    pairs = {"DRIVER": "{PostgreSQL Unicode}", "SERVER": "127.0.0.1", "PORT": "5432", "DATABASE": "postgres"}
    for key, value in values.items():
        if key in _ODBC_KEYS:
            pairs[_ODBC_KEYS[key]] = value
    if password is not None:
        pairs["PWD"] = "{" + password.replace("}", "}}") + "}"
    return ";".join(f"{k}={v}" for k, v in pairs.items()) + ";"


def _keyword_pairs(conninfo: str) -> list[tuple[str, str]]:
    pairs = []
    for match in re.finditer(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", conninfo):
        value = match.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        pairs.append((match.group(1), value))
    return pairs
