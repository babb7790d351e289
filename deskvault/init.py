"""`deskvault init`: create what deskvault needs before its first backup, once; run again, it does nothing.

In order: the key file (mode 0600) if there is none, the bucket if it is missing (or which permission
is lacking), the control database's tables, every pool's queues, and per target what its engine needs
(PostgreSQL: the WAL streamer's replication slot). `dry_run` says what would be done and does none of it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pika
import pika.exceptions

from deskvault_core.config import Settings
from deskvault_core.errors import DeskvaultError
from producers.publisher import declare_topology
from workers.context import open_ledger, open_store
from workers.engines.registry import engine_for
from workers.ledger.schema import SCHEMA_VERSION
from workers.queues import topology_problems
from workers.repository.errors import RepositoryError
from workers.repository.keyring import Keyring


class InitError(DeskvaultError):
    """A step of `deskvault init` could not be done; the message says which and what to change."""


def run_init(settings: Settings, *, dry_run: bool, say: Callable[[str], None]) -> None:
    """Each step's outcome goes to `say` as one line; raises InitError at the first step that fails."""
    say(_key_file(Path(settings.repository.key_file), dry_run))
    say(_bucket(settings, dry_run))
    say(_control_db(settings, dry_run))
    say(_queues(settings, dry_run))
    for name in sorted(settings.targets):
        try:
            for line in engine_for(settings.target(name)).prepare(dry_run=dry_run):
                say(f"target {name}: {line}")
        except DeskvaultError as e:
            raise InitError(f"target {name}: {e}") from None


def _key_file(path: Path, dry_run: bool) -> str:
    if path.exists():
        keyring = Keyring.load(path)  # refuses a file others may read, saying so
        return f"key file {path} exists ({len(keyring.key_ids)} key(s), active {keyring.active_id})"
    if dry_run:
        return f"would create key file {path} (mode 0600)"
    keyring = Keyring.create(path)
    return (
        f"created key file {path} (mode 0600, key {keyring.active_id}); keep a copy somewhere safe: "
        "without it no backup can be read"
    )


def _bucket(settings: Settings, dry_run: bool) -> str:
    r = settings.repository
    store = open_store(settings)
    if store.bucket_exists():
        return f"bucket {r.bucket} exists"
    if dry_run:
        return f"would create bucket {r.bucket}"
    try:
        store.ensure_bucket()
    except RepositoryError as e:
        raise InitError(
            f"bucket {r.bucket} is missing and could not be created ({e}); create it yourself, or grant "
            "these credentials s3:CreateBucket, then run `deskvault init` again"
        ) from None
    return f"created bucket {r.bucket}"


def _control_db(settings: Settings, dry_run: bool) -> str:
    ledger = open_ledger(settings)
    version = ledger.schema_version()  # a LedgerError says what to check when it cannot connect
    if version >= SCHEMA_VERSION:
        return f"control database at schema version {version}"
    if dry_run:
        return f"would migrate the control database from schema version {version} to {SCHEMA_VERSION}"
    return f"control database migrated from schema version {version} to {ledger.migrate()}"


def _queues(settings: Settings, dry_run: bool) -> str:
    url, limit = settings.broker.url, settings.broker.delivery_limit
    try:
        problems = topology_problems(url, limit)
        if not problems:
            return "every pool's queues are declared"
        if dry_run:
            return f"would declare {len(problems)} queue(s): {'; '.join(problems[:3])}"
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            declare_topology(connection.channel(), limit)
        finally:
            connection.close()
    except pika.exceptions.ChannelClosedByBroker as e:
        raise InitError(
            f"a queue exists with other arguments than deskvault declares ({e.reply_text}); delete it once "
            "drained, then run `deskvault init` again"
        ) from None
    except (pika.exceptions.AMQPError, OSError) as e:
        raise InitError(
            f"RabbitMQ unreachable ({type(e).__name__}); check [broker] url and that it runs"
        ) from None
    return f"declared {len(problems)} queue(s) for the pools"
