"""The `deskvault` command: one sub-command per job, each with --help.

Configuration comes from --config, else $DESKVAULT_CONFIG, else ./.deskvault/deskvault.toml (written by
`deskvault up`), else /etc/deskvault/deskvault.toml; with none of them a command that needs one fails
saying where it looked. Any key can be overridden with DESKVAULT_<SECTION>__<KEY>.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from deskvault_core import lifeline
from deskvault_core.errors import DeskvaultError
from deskvault_core.logs import LOG_FORMAT_ENV, LOG_FORMATS, setup_logging
from deskvault_core.memory import keep_heap_small
from messages.events import EVENT_CLASSES
from messages.topology import POOLS
from workers.runner import DEFAULT_STOP_TIMEOUT_SECONDS

log = logging.getLogger("deskvault")

LOCAL_CONFIG = Path(".deskvault/deskvault.toml")
SYSTEM_CONFIG = Path("/etc/deskvault/deskvault.toml")


def main(argv: Sequence[str] | None = None) -> int:
    lifeline.hold()  # a child of `deskvault up` stops with it
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "publish":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ[LOG_FORMAT_ENV] = args.log_format  # worker processes and `up`'s children log alike
    setup_logging(args.log_level, args.log_format)
    keep_heap_small()
    try:
        return int(args.func(args, extra) or 0)
    except DeskvaultError as e:
        print(f"deskvault: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deskvault", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"deskvault {_version()}")
    p.add_argument(
        "--config",
        help=f"TOML config file (env: DESKVAULT_CONFIG; else ./{LOCAL_CONFIG}, else {SYSTEM_CONFIG})",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("DESKVAULT_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (env: DESKVAULT_LOG_LEVEL; default INFO)",
    )
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get(LOG_FORMAT_ENV, "text"),
        help=f"text, or json: one object per line for log shippers (env: {LOG_FORMAT_ENV}; default text)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run everything locally: SeaweedFS, a demo target, scheduler, all pools")
    up.add_argument("--state-dir", default=".deskvault", help="where local data lives (default .deskvault)")
    up.add_argument(
        "--demo-port", type=int, default=55432, help="port of the demo PostgreSQL (default 55432)"
    )
    up.add_argument("--s3-port", type=int, default=8333, help="port of the local S3 server (default 8333)")
    up.add_argument(
        "--metrics-port",
        type=int,
        default=9310,
        help="first metrics port; pool i serves on port+i (default 9310)",
    )
    up.set_defaults(func=_cmd_up)

    sch = sub.add_parser("scheduler", help="emit due backup and snapshot events from each policy")
    sch.add_argument("--once", action="store_true", help="emit what is due now and exit")
    sch.add_argument("--json", action="store_true", help="with --once: print what was published as JSON")
    sch.add_argument(
        "--metrics-port",
        type=int,
        help="serve /metrics and /healthz (503 once no tick has finished for a while) on this port",
    )
    sch.set_defaults(func=_cmd_scheduler)

    w = sub.add_parser("worker", help="run worker pools")
    w.add_argument(
        "--pool",
        action="extend",
        nargs="+",
        dest="pools",
        metavar="POOL",
        choices=POOLS,
        help=f"{', '.join(POOLS)}; several allowed (default: all)",
    )
    w.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    w.add_argument("--threads", type=int, default=4, help="threads per process (default 4)")
    w.add_argument("--burst", action="store_true", help="exit once the pools' queues are empty")
    w.add_argument(
        "--stop-timeout",
        type=int,
        default=DEFAULT_STOP_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="on SIGTERM, how long running events may take to finish before they are handed back to "
        f"the queue to start over (default {DEFAULT_STOP_TIMEOUT_SECONDS}); give the service manager "
        "longer (terminationGracePeriodSeconds, TimeoutStopSec)",
    )
    w.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (default [metrics] port)"
    )
    w.add_argument("--no-metrics", action="store_true", help="serve no metrics")
    w.set_defaults(func=_cmd_worker)

    ws = sub.add_parser("wal-stream", help="stream every target's WAL into the repository (the log layer)")
    ws.add_argument(
        "--target",
        action="extend",
        nargs="+",
        dest="targets",
        metavar="TARGET",
        help="stream only these targets (default: all)",
    )
    ws.add_argument(
        "--metrics-port",
        type=int,
        help="serve the live-RPO metric here (default: wal.metrics_port, 9309)",
    )
    ws.add_argument("--no-metrics", action="store_true", help="serve no metrics")
    ws.set_defaults(func=_cmd_wal_stream)

    pub = sub.add_parser(
        "publish",
        help="publish an event: deskvault publish backup-due --target demo --kind full",
        description="Publish one event with publisher confirms. Fields are given as --name value "
        "(dashes or underscores); event_id, occurred_at and idempotency_key are filled in "
        f"when not given. Event types: {', '.join(EVENT_CLASSES)}.",
        add_help=False,  # `publish EVENT --help` lists that event's fields
    )
    pub.add_argument(
        "-h",
        "--help",
        action="store_true",
        help="show this help, or with EVENT that event's fields, and exit",
    )
    pub.add_argument(
        "event_type", metavar="EVENT", nargs="?", help=f"one of: {', '.join(sorted(EVENT_CLASSES))}"
    )
    pub.set_defaults(func=_cmd_publish, parser=pub)

    b = sub.add_parser("backups", help="inspect backups in the repository")
    bsub = b.add_subparsers(dest="backups_command", required=True, metavar="ACTION")
    bl = bsub.add_parser("list", help="list a target's committed backups")
    bl.add_argument("--target", required=True, help="a [targets.NAME] of the config")
    bl.add_argument("--json", action="store_true", help="machine-readable output")
    bl.set_defaults(func=_cmd_backups_list)

    bv = bsub.add_parser("verify", help="read back and check every object of a target, and the WAL chain")
    bv.add_argument("--target", required=True, help="a [targets.NAME] of the config")
    bv.add_argument("--json", action="store_true", help="print the result as JSON (progress goes to stderr)")
    bv.set_defaults(func=_cmd_backups_verify)

    be = bsub.add_parser("expire", help="delete what the retention policy no longer keeps")
    be.add_argument("--target", required=True, help="a [targets.NAME] of the config")
    be.add_argument("--dry-run", action="store_true", help="show what would be deleted; delete nothing")
    be.add_argument("--json", action="store_true", help="print the result as JSON (progress goes to stderr)")
    be.set_defaults(func=_cmd_backups_expire)

    r = sub.add_parser("restore", help="restore a target to a point in time (default: latest) into a folder")
    r.add_argument("--target", required=True, help="a [targets.NAME] of the config")
    r.add_argument("--into", required=True, type=Path, help="new or empty folder for the data directory")
    goal = r.add_mutually_exclusive_group()
    goal.add_argument(
        "--at",
        metavar="TIME",
        help="restore to this moment: the last commit at or before it (RFC 3339, e.g. "
        "2026-11-27T10:15:30Z); default: the latest",
    )
    goal.add_argument("--xid", type=int, metavar="XID", help="restore up to this transaction's commit")
    goal.add_argument("--lsn", metavar="LSN", help="restore up to this WAL position (e.g. 0/3000148)")
    goal.add_argument("--name", metavar="NAME", help="restore up to this restore point (see: deskvault mark)")
    r.add_argument(
        "--start", action="store_true", help="start PostgreSQL, wait for recovery, report the time reached"
    )
    r.add_argument(
        "--port", type=int, default=0, help="port for --start (default: a free one, printed once running)"
    )
    r.add_argument(
        "--tablespace",
        action="append",
        default=[],
        metavar="OID_OR_NAME_OR_OLD_PATH=NEW_PATH",
        help="where a tablespace goes (repeatable); default: DIR.tablespaces/<oid> beside the data directory",
    )
    r.add_argument("--json", action="store_true", help="print the result as JSON (progress goes to stderr)")
    r.set_defaults(func=_cmd_restore)

    mk = sub.add_parser(
        "mark",
        help="create a named restore point on a target, to restore to later with restore --name",
    )
    mk.add_argument("--target", required=True, help="a [targets.NAME] of the config")
    mk.add_argument("name", metavar="NAME", help="the restore point's name (up to 63 bytes)")
    mk.add_argument(
        "--wait", type=float, default=60, metavar="SECONDS", help="wait this long for it to be archived"
    )
    mk.set_defaults(func=_cmd_mark)

    t = sub.add_parser("tenants", help="the tenants deskvault knows, with their lifecycle state")
    tsub = t.add_subparsers(dest="tenants_command", required=True)
    tl = tsub.add_parser("list", help="tenants from the config and the accounts query")
    tl.add_argument("--json", action="store_true", help="machine-readable output")
    tl.set_defaults(func=_cmd_tenants_list)
    for verb, held, text in (
        ("hold", True, "place a legal hold: the tenant's data is never purged while it stands"),
        ("release", False, "lift a legal hold; a purge already due is emitted again"),
    ):
        th = tsub.add_parser(verb, help=text)
        th.add_argument("--tenant", required=True, help="the tenant's id (see `deskvault tenants list`)")
        th.set_defaults(func=_cmd_tenants_hold, held=held)

    tr = tsub.add_parser(
        "restore",
        help="restore one tenant's database to a moment on its live target, touching no other tenant",
        description="Restore one tenant's database to exactly the last commit at or before --at: by "
        "default beside the current one, under a new name; with --replace in its place (the current one "
        "is renamed aside and kept); with --download as a downloadable export (published for the export "
        "pool). Refused before anything is downloaded when the moment is outside the restorable window "
        "(see `deskvault backups list`), the tenant is unknown or purged, or the new name is taken.",
    )
    tr.add_argument("--tenant", required=True, help="the tenant's id (see `deskvault tenants list`)")
    tr.add_argument("--at", required=True, help="the moment, RFC 3339 with an offset: 2026-11-27T10:14:00Z")
    how = tr.add_mutually_exclusive_group()
    how.add_argument(
        "--as", dest="as_name", metavar="NAME", help="the new database's name (default <db>_restored_<at>)"
    )
    how.add_argument(
        "--replace",
        action="store_true",
        help="put the restored database in place of the current one, which is renamed aside and kept",
    )
    how.add_argument(
        "--download", action="store_true", help="an export as of the moment (made by the export pool)"
    )
    tr.add_argument(
        "--force", action="store_true", help="with --replace: terminate the sessions using the database"
    )
    tr.add_argument("--json", action="store_true", help="print the result as JSON (progress goes to stderr)")
    tr.set_defaults(func=_cmd_tenants_restore)

    tt = tsub.add_parser("token", help="the bearer token the admin panel uses for a tenant's downloads")
    tt.add_argument("--tenant", required=True, help="the tenant's id (see `deskvault tenants list`)")
    tt.set_defaults(func=_cmd_tenants_token)

    e = sub.add_parser("exports", help="tenants' database exports")
    esub = e.add_subparsers(dest="exports_command", required=True)
    el = esub.add_parser("list", help="a tenant's finished exports")
    el.add_argument("--tenant", required=True, help="the tenant's id (see `deskvault tenants list`)")
    el.add_argument("--json", action="store_true", help="machine-readable output")
    el.set_defaults(func=_cmd_exports_list)

    d = sub.add_parser("downloads", help="the HTTPS endpoint that lists and serves tenants' downloads")
    dsub = d.add_subparsers(dest="downloads_command", required=True)
    dsub.add_parser("serve", help="serve until interrupted ([downloads] in the config)").set_defaults(
        func=_cmd_downloads_serve
    )

    sn = sub.add_parser("snapshots", help="servers' snapshots (files driver)")
    snsub = sn.add_subparsers(dest="snapshots_command", required=True)
    snl = snsub.add_parser("list", help="committed snapshots, per server")
    snl.add_argument("--server", help="only this server")
    snl.add_argument("--json", action="store_true", help="machine-readable output (without entries)")
    snl.set_defaults(func=_cmd_snapshots_list)
    snr = snsub.add_parser("restore", help="recreate a server's snapshotted trees under a folder")
    snr.add_argument("--server", required=True, help="a [servers.NAME] of the config")
    snr.add_argument("--into", required=True, type=Path, help="a new or empty folder")
    snr.add_argument("--at", help="the newest snapshot finished at or before this time (default: newest)")
    snr.add_argument(
        "--owners",
        action="store_true",
        help="give every entry its recorded owner, and files their setuid/setgid bits (root only)",
    )
    snr.set_defaults(func=_cmd_snapshots_restore)

    q = sub.add_parser("dlq", help="dead letters: list them with their reasons, replay or drop them")
    qsub = q.add_subparsers(dest="dlq_command", required=True)
    ql = qsub.add_parser("list", help="a pool's dead letters, oldest first (they stay queued)")
    ql.add_argument("--pool", required=True, choices=POOLS, help="the pool whose dead letters to act on")
    ql.add_argument("--limit", type=int, default=100, help="list at most this many (default 100)")
    ql.add_argument("--json", action="store_true", help="machine-readable output")
    ql.set_defaults(func=_cmd_dlq_list)
    for verb, text in (
        ("replay", "publish dead letters back to their pool's queue (after fixing the cause)"),
        ("drop", "delete dead letters for good"),
    ):
        qa = qsub.add_parser(verb, help=text)
        qa.add_argument("--pool", required=True, choices=POOLS, help="the pool whose dead letters to act on")
        chosen = qa.add_mutually_exclusive_group(required=True)
        chosen.add_argument("--message-id", action="append", help="a message id from `dlq list` (repeatable)")
        chosen.add_argument("--all", action="store_true", help="every dead letter of the pool")
        qa.add_argument("--json", action="store_true", help="print the message ids acted on as JSON")
        qa.set_defaults(func=_cmd_dlq_act, verb=verb)

    st = sub.add_parser(
        "status",
        help="per target RPO, backups and drills; per pool queues, jobs and waits",
        description="Exit status: 0 nothing needs attention, 1 something to look at (an unknown RPO, "
        "dead letters, failed jobs, a drill never run, a source that could not be read), 2 a failure "
        "(the newest drill failed, the live RPO is stuck).",
    )
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "--prometheus",
        metavar="URL",
        help="read waits and failure rates from this Prometheus (default: [metrics] prometheus_url)",
    )
    st.set_defaults(func=_cmd_status)

    ini = sub.add_parser(
        "init",
        help="create the key file, bucket, control tables, queues and replication slots (idempotent)",
        description="Create, where missing, what deskvault needs before its first backup: the key file "
        "(mode 0600), the bucket, the control database's tables, every pool's queues and each target's "
        "replication slot. Run again, it changes nothing. Then run `deskvault check`.",
    )
    ini.add_argument("--dry-run", action="store_true", help="say what would be done; do none of it")
    ini.set_defaults(func=_cmd_init)

    chk = sub.add_parser(
        "check",
        help="is everything in place to protect the targets? one line per check; exit 0 OK, 1 WARN, 2 FAIL",
        description="Check the configuration, the broker and its queues, the control database, the "
        "bucket (a probe object written and removed), the key file, and per target: reachable, "
        "replication permission and connection, wal_level, the replication slot and its streamer, the "
        "client programs' version, the data directory, the live RPO, and the newest full, differential, "
        "log and drill against their schedules. Each line is OK, WARN or FAIL, and says what to do. "
        "Exit status: 0 every check OK, 1 any WARN, 2 any FAIL (usable as a Nagios check).",
    )
    chk.add_argument("--target", action="append", help="only this target (repeatable; default: all)")
    chk.add_argument("--json", action="store_true", help="machine-readable output")
    chk.add_argument(
        "--prometheus",
        metavar="URL",
        help="read the live RPO from this Prometheus (default: [metrics] prometheus_url, else the streamer)",
    )
    chk.set_defaults(func=_cmd_check)

    m = sub.add_parser("migrate", help="create or upgrade the control database's tables")
    m.set_defaults(func=_cmd_migrate)

    k = sub.add_parser("keys", help="manage the key-encryption key file")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    ksub.add_parser("create", help="create a new key file").set_defaults(func=_cmd_keys_create)
    ksub.add_parser("rotate", help="add a new active key; old keys stay for reading").set_defaults(
        func=_cmd_keys_rotate
    )
    kl = ksub.add_parser(
        "list",
        help="every key, the active one, and what still uses each (reads every object's header)",
        description="Every key of the key file, which is active, and what still needs each: the objects "
        "whose header names it (per area: targets, servers, tenants, keystore...) and the legacy "
        "tenant keys in the control database it wraps. Objects whose header cannot be read are listed too.",
    )
    kl.add_argument("--json", action="store_true", help="machine-readable output")
    kl.set_defaults(func=_cmd_keys_list)
    kr = ksub.add_parser(
        "retire",
        help="remove a key nothing uses any more from the key file",
        description="Remove KEY from the key file, after checking every object's header and the control "
        "database's tenant keys: refused while KEY is active, unknown, or used by anything.",
    )
    kr.add_argument("key_id", metavar="KEY", help="the key's id, as `deskvault keys list` shows it")
    kr.set_defaults(func=_cmd_keys_retire)

    comp = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print tab completion for every command and option. bash: "
        "`deskvault completion bash > /etc/bash_completion.d/deskvault`; zsh: "
        '`deskvault completion zsh > "${fpath[1]}/_deskvault"`.',
    )
    comp.add_argument("shell", choices=COMPLETION_SHELLS, help="the shell to complete in")
    comp.set_defaults(func=_cmd_completion)
    return p


def _settings(args: argparse.Namespace) -> Any:
    from deskvault_core.config import load_settings

    return load_settings(_config_path(args))


def _config_path(args: argparse.Namespace) -> str:
    """The config file to read; never built-in defaults, which would point at nothing of the user's."""
    from deskvault_core.errors import ConfigError

    path = args.config or os.environ.get("DESKVAULT_CONFIG")
    if path:
        return path
    for place in (LOCAL_CONFIG, SYSTEM_CONFIG):
        if place.is_file():
            return str(place.resolve())
    raise ConfigError(
        f"no configuration: looked for --config, $DESKVAULT_CONFIG, {Path.cwd() / LOCAL_CONFIG} and "
        f"{SYSTEM_CONFIG}; pass --config FILE (ops/deskvault.example.toml shows every key), or run "
        "`deskvault up` for a local demo"
    )


def _version() -> str:
    from deskvault_core.version import version

    return version()


def _cmd_up(args: argparse.Namespace, _extra: list[str]) -> int:
    from deskvault.local.up import UpOptions, run_up

    return run_up(
        UpOptions(
            state_dir=Path(args.state_dir).resolve(),
            demo_port=args.demo_port,
            s3_port=args.s3_port,
            metrics_port=args.metrics_port,
            log_level=args.log_level,
        )
    )


def _cmd_scheduler(args: argparse.Namespace, _extra: list[str]) -> int:
    from producers.heartbeat import Heartbeat
    from producers.publisher import Publisher
    from producers.scheduler import Scheduler
    from workers.context import open_ledger
    from workers.ledger.ledger import utcnow

    if args.json and not args.once:
        raise _usage("--json: only with --once (a running scheduler logs what it publishes)")
    settings = _settings(args)
    _check_tenant_databases(settings)
    ledger = open_ledger(settings)
    ledger.migrate()
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        scheduler = Scheduler(settings, ledger, publisher, clock=utcnow)
        if args.once:
            published = scheduler.tick()
            if args.json:
                print(json.dumps({"published": [e.to_dict() for e in published]}))
                return 0
            print(f"published {len(published)} event(s)")
            for event in published:
                print(f"  {event.type} {event.idempotency_key}")
            return 0
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        heartbeat = Heartbeat()
        if args.metrics_port is not None:
            heartbeat.serve(settings.metrics.host, args.metrics_port)
        scheduler.run(stop, on_tick=heartbeat.beat)
    return 0


def _check_tenant_databases(settings: Any) -> None:
    """Refuse to start while two of the accounts query's tenants share a database (the config's own
    were refused as it loaded); an accounts database not up yet is checked per event instead."""
    from workers.tenants.registry import AccountsQueryError, TenantRegistry

    try:
        TenantRegistry(settings).check()
    except AccountsQueryError as e:
        log.warning("tenants' databases not checked at start-up: %s", e)


def _cmd_worker(args: argparse.Namespace, _extra: list[str]) -> int:
    from messages.topology import POOLS
    from workers.runner import WorkerOptions, run

    if args.stop_timeout < 0:
        raise _usage("--stop-timeout: must be 0 or more seconds")
    settings = _settings(args)
    _check_tenant_databases(settings)
    options = WorkerOptions(
        config=_config_path(args),
        pools=tuple(args.pools or POOLS),
        processes=args.processes,
        threads=args.threads,
        burst=args.burst,
        stop_timeout_seconds=args.stop_timeout,
        metrics_host=settings.metrics.host,
        metrics_port=None if args.no_metrics else (args.metrics_port or settings.metrics.port),
        log_level=args.log_level,
    )
    try:
        return run(options)
    except ValueError as e:
        print(f"deskvault: error: {e}", file=sys.stderr)
        return 2


def _cmd_wal_stream(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.context import open_repository
    from workers.engines.registry import engine_for

    settings = _settings(args)
    names = args.targets or sorted(settings.targets)
    targets = [settings.target(name) for name in names]
    repo = open_repository(settings)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if not args.no_metrics:
        from workers.metrics import serve_metrics

        port = args.metrics_port or settings.wal.metrics_port
        serve_metrics(settings.metrics.host, port)
        log.info("wal-stream metrics on http://%s:%d/metrics", settings.metrics.host, port)
    threads = [
        threading.Thread(
            target=engine_for(t)
            .log_streamer(repo, Path(settings.wal.spool_dir) / t.name, settings.wal.upload_interval_seconds)
            .run,
            args=(stop,),
            name=f"wal-{t.name}",
        )
        for t in targets
    ]
    for thread in threads:
        thread.start()
    log.info("streaming WAL of %s; uploads every %ds", ", ".join(names), settings.wal.upload_interval_seconds)
    for thread in threads:
        thread.join()
    return 0


def _cmd_publish(args: argparse.Namespace, extra: list[str]) -> int:
    from messages.events import build_event
    from producers.publisher import Publisher

    if args.help:
        print(_event_help(args.event_type) if args.event_type in EVENT_CLASSES else args.parser.format_help())
        args.parser.exit()
    if args.event_type is None:
        args.parser.error("EVENT: name the event to publish (see `deskvault publish --help`)")
    values = _field_values(extra)
    event = build_event(args.event_type, values)
    settings = _settings(args)
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher.publish(event)
    print(json.dumps(event.to_dict()))
    return 0


def _event_help(event_type: str) -> str:
    """An event's fields as its JSON Schema describes them: what `publish EVENT --help` prints."""
    from messages.events import COMMON_FIELDS
    from messages.schema_files import load_schema

    schema = load_schema(event_type)
    required = set(schema.get("required", ()))
    lines = [
        f"usage: deskvault publish {event_type} --FIELD VALUE ...",
        "",
        schema.get("description", ""),
        "",
    ]
    lines.append("\nfields (event_id, idempotency_key and occurred_at are filled in when not given):")
    for name, spec in schema["properties"].items():
        if name in ("type", "version"):
            continue
        need = "required" if name in required and name not in COMMON_FIELDS else "optional"
        lines.append(f"  --{name.replace('_', '-')}  ({need}) {spec.get('description', '')}")
    return "\n".join(lines)


def _field_values(extra: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    i = 0
    while i < len(extra):
        name = extra[i]
        if not name.startswith("--") or i + 1 >= len(extra):
            raise _usage(f"expected --field value pairs, got {' '.join(extra[i:])!r}")
        if "=" in name:
            key, value = name[2:].split("=", 1)
            i += 1
        else:
            key, value = name[2:], extra[i + 1]
            i += 2
        values[key.replace("-", "_")] = value
    return values


def _usage(message: str) -> DeskvaultError:
    error = DeskvaultError(message)
    error.exit_code = 2
    return error


def _cmd_tenants_list(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.context import open_ledger
    from workers.tenants.registry import TenantRegistry

    settings = _settings(args)
    ledger = open_ledger(settings)
    rows = []
    for tenant in TenantRegistry(settings).all():
        account = ledger.account(tenant.id) or {}
        purge = account.get("purge_after")
        rows.append(
            {
                "tenant": tenant.id,
                "plan": tenant.plan,
                "downloadable_backups": tenant.downloadable_backups,
                "database": tenant.database,
                "target": tenant.target,
                "source": tenant.source,
                "status": account.get("status", "active"),
                "purge_after": f"{purge:%Y-%m-%dT%H:%M:%SZ}" if purge else None,
                "legal_hold": account.get("legal_hold", False),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no tenants: add [tenants.<id>] to the config or set lifecycle.accounts_odbc")
        return 0
    widths = (20, 10, 9, 12, 20, 8, 0)

    def line(*cells: str) -> str:
        return " ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths, strict=True)).rstrip()

    print(line("TENANT", "PLAN", "DOWNLOADS", "TARGET", "DATABASE", "STATUS", "PURGE AFTER"))
    for r in rows:
        downloads = "yes" if r["downloadable_backups"] else "no"
        purge = (r["purge_after"] or "-") + (" (legal hold)" if r["legal_hold"] else "")
        print(line(r["tenant"], r["plan"], downloads, r["target"], r["database"], r["status"], purge))
    return 0


def _cmd_tenants_hold(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.context import open_ledger
    from workers.tenants.registry import TenantRegistry

    settings = _settings(args)
    ledger = open_ledger(settings)
    if ledger.account(args.tenant) is None:
        TenantRegistry(settings).get(args.tenant)  # a hold on a tenant nobody knows is a typo
    ledger.set_legal_hold(args.tenant, args.held)
    print(f"tenant {args.tenant}: legal hold {'placed' if args.held else 'released'}")
    return 0


def _cmd_tenants_restore(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.context import build
    from workers.tenants.restore import REPLACE, SIDE_BY_SIDE, TenantRestoreRequest, restore_tenant

    at = _parse_at(args.at)
    if args.force and not args.replace:
        raise _usage("--force: only with --replace (it terminates the sessions using the database)")
    settings = _settings(args)
    if args.download:
        return _publish_download(settings, args.tenant, at, args.json)
    request_id, requested_by = _typed_here()
    request = TenantRestoreRequest(
        request_id=request_id,
        requested_by=requested_by,
        tenant=args.tenant,
        at=at,
        mode=REPLACE if args.replace else SIDE_BY_SIDE,
        as_name=args.as_name,
        force=args.force,
    )
    out = sys.stderr if args.json else sys.stdout
    result = restore_tenant(build(settings), request, lambda line: print(f"  {line}", file=out, flush=True))
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        print(result.summary())
    return 0


def _typed_here() -> tuple[str, str]:
    """A request typed at this terminal: its own id, and the user and host who typed it."""
    import getpass
    import socket
    import uuid

    return f"cli-{uuid.uuid4().hex[:12]}", f"{getpass.getuser()}@{socket.gethostname()}"


def _publish_download(settings: Any, tenant: str, at: datetime | None, as_json: bool) -> int:
    from messages.events import ExportRequested
    from producers.publisher import Publisher
    from workers.tenants.registry import TenantRegistry

    TenantRegistry(settings).get(tenant)  # a typo is told here, not in a dead letter
    request_id, requested_by = _typed_here()
    event = ExportRequested.new(tenant=tenant, request_id=request_id, requested_by=requested_by, as_of=at)
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher.publish(event)
    if as_json:
        print(json.dumps(event.to_dict()))
    else:
        print(
            f"export of tenant {tenant} as of {_shown_at(at)} requested ({event.request_id}); the export "
            f"pool makes it: see `deskvault exports list --tenant {tenant}`"
        )
    return 0


def _shown_at(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%dT%H:%M:%SZ}" if moment else "the latest moment"


def _download_service(settings: Any) -> Any:
    from workers.context import build
    from workers.tenants.downloads import DownloadService

    return DownloadService(build(settings))


def _cmd_tenants_token(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.tenants.registry import TenantRegistry

    settings = _settings(args)
    TenantRegistry(settings).get(args.tenant)
    print(_download_service(settings).tenant_token(args.tenant))
    return 0


def _cmd_exports_list(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.context import build
    from workers.tenants.exports import list_exports
    from workers.tenants.keys import TenantKeyDestroyed, tenant_repository
    from workers.tenants.registry import TenantRegistry

    settings = _settings(args)
    TenantRegistry(settings).get(args.tenant)
    try:
        found = list_exports(tenant_repository(build(settings), args.tenant), args.tenant)
    except TenantKeyDestroyed:
        found = []
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print(f"no exports of {args.tenant}")
        return 0
    print(f"{'EXPORT':<36} {'KIND':<10} {'AS OF':<21} {'CREATED':<21} {'EXPIRES':<21} {'SIZE':>10}  REQUEST")
    for m in found:
        expires = _second(m["expires_at"], "kept as newest")
        print(
            f"{m['export_id']:<36} {m['kind']:<10} {_second(m['as_of']):<21} {_second(m['created_at']):<21} "
            f"{expires:<21} {_mib(m['plain_size']):>10}  {m['request_id']}"
        )
    return 0


def _second(iso: str | None, absent: str = "latest") -> str:
    return absent if iso is None else iso[:19] + "Z"


def _cmd_downloads_serve(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.tenants.download_endpoint import DownloadEndpoint

    settings = _settings(args)
    endpoint = DownloadEndpoint(_download_service(settings))
    print(
        f"serving tenants' downloads on https://{settings.downloads.host}:{settings.downloads.port}",
        flush=True,
    )
    endpoint.serve()  # until SIGINT or SIGTERM
    return 0


def _cmd_snapshots_list(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.context import open_repository
    from workers.servers.ebs import list_sets
    from workers.servers.filetrees import list_snapshots

    settings = _settings(args)
    servers = [args.server] if args.server else sorted(settings.servers)
    if args.server and args.server not in settings.servers:
        raise _usage(f"--server: {args.server!r} is not configured")
    repo = open_repository(settings)
    rows = [
        {k: v for k, v in m.items() if k != "entries"}
        for name in servers
        if settings.servers[name].driver == "files"
        for m in list_snapshots(repo, name)
    ]
    sets = [r for name in servers if settings.servers[name].driver == "ebs" for r in list_sets(repo, name)]
    if args.json:
        print(json.dumps(rows + sets, indent=2))
        return 0
    if not rows and not sets:
        print("no snapshots yet")
        return 0
    for r in sets:
        copies = f", copies in {r['dr_region']}: {len(r['dr_snapshots'])}" if r["dr_region"] else ""
        print(
            f"{r['server']:<20} ebs set {r['set_id']}: {len(r['snapshots'])} volume(s) in "
            f"{r['region']}{copies}"
        )
    if not rows:
        return 0
    print(
        f"{'SERVER':<20} {'SNAPSHOT':<18} {'FINISHED':<21} {'FILES':>8} {'SIZE':>12} {'NEW':>12} "
        f"{'STORED':>12}"
    )
    for m in rows:
        print(
            f"{m['server']:<20} {m['snapshot_id']:<18} {m['finished_at'][:19] + 'Z':<21} {m['files']:>8} "
            f"{_mib(m['bytes']):>12} {_mib(m['new_bytes']):>12} {_mib(m['stored_new_bytes']):>12}"
        )
    return 0


def _cmd_snapshots_restore(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.context import open_repository
    from workers.servers.filetrees import list_snapshots
    from workers.servers.tree_restore import restore_snapshot

    settings = _settings(args)
    if args.server not in settings.servers:
        raise _usage(f"--server: {args.server!r} is not configured")
    at = _parse_at(args.at)
    repo = open_repository(settings)
    found = [
        m
        for m in list_snapshots(repo, args.server)
        if at is None or datetime.fromisoformat(m["finished_at"]) <= at
    ]
    if not found:
        when = f" finished at or before {args.at}" if at else ""
        raise DeskvaultError(f"server {args.server} has no snapshot{when}; see `deskvault snapshots list`")
    manifest = found[-1]
    print(f"restoring snapshot {manifest['snapshot_id']} of {args.server} into {args.into}", flush=True)
    restore_snapshot(
        repo, manifest, args.into, owners=args.owners, on_progress=lambda line: print(f"  {line}", flush=True)
    )
    return 0


def _cmd_backups_list(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.backups.inventory import inventory
    from workers.context import open_repository

    settings = _settings(args)
    found = inventory(open_repository(settings), settings.target(args.target))
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found["backups"]:
        print(f"no backups of {args.target} yet")
        return 0
    print(f"{'BACKUP':<26} {'KIND':<5} {'FINISHED':<28} {'LSN RANGE':<24} {'SIZE':>10} {'STORED':>10}")
    for m in found["backups"]:
        lsns = f"{m['start_lsn']}..{m['stop_lsn']}"
        print(
            f"{m['backup_id']:<26} {m['kind']:<5} {m['finished_at']:<28} {lsns:<24} "
            f"{_mib(m['plain_size']):>10} {_mib(m['stored_size']):>10}"
        )
        if m.get("restorable"):
            print(f"{'':<26} restores: {m['restorable']}")
    wal = found["wal"]
    print(
        f"\nWAL: {wal['segments']} segments {wal['first'] or ''}..{wal['last'] or ''}"
        f"{', writing ' + wal['partial'] if wal['partial'] else ''}; newest upload {wal['newest_upload']}"
    )
    if wal["gaps"]:
        print(f"WAL GAPS: {', '.join(wal['gaps'])} -- take a full backup")
    window = found["restorable_window"]
    if window is None:
        print("restorable: nothing yet")
    else:
        print("restorable: " + ", ".join(f"{a} .. {b}" for a, b in window["intervals"]))
    return 0


def _cmd_backups_verify(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.backups.verify import verify
    from workers.context import open_repository

    settings = _settings(args)
    target = settings.target(args.target)
    step = [0]
    out = sys.stderr if args.json else sys.stdout

    def progress(done: int, total: int) -> None:
        if done == total or done - step[0] >= max(total // 10, 1):
            step[0] = done
            print(f"  {done}/{total} objects checked", file=out, flush=True)

    report = verify(open_repository(settings), target, progress)
    if args.json:
        problems = [{"key": p.key, "detail": p.detail} for p in report.problems]
        verdict = {"ok": not problems, "objects": report.objects, "plain_bytes": report.plain_bytes}
        print(json.dumps({"target": args.target, **verdict, "problems": problems}))
        return 1 if problems else 0
    for problem in report.problems:
        print(f"BAD {problem.key}: {problem.detail}")
    if report.problems:
        print(
            f"{len(report.problems)} problem(s) in {report.objects} objects of {args.target}; restore from "
            "another chain, or take a full backup now"
        )
        return 1
    print(f"OK: {report.objects} objects of {args.target} verified ({_mib(report.plain_bytes)}), no WAL gaps")
    return 0


def _cmd_backups_expire(args: argparse.Namespace, _extra: list[str]) -> int:
    from datetime import UTC, datetime

    from workers.backups import usage
    from workers.backups.expire import expire
    from workers.context import open_ledger, open_repository

    settings = _settings(args)
    repo, target, now = open_repository(settings), settings.target(args.target), datetime.now(UTC)
    if args.dry_run:
        result = expire(repo, target, now, dry_run=True)
    else:
        result = usage.expire_and_record(open_ledger(settings), repo, target, now)
    if args.json:
        counts = {
            "deleted": result.deleted,
            "aborted_uploads": result.aborted_uploads,
            "orphans": result.orphans,
        }
        print(json.dumps({"target": args.target, "dry_run": args.dry_run, **counts, "lines": result.lines}))
        return 0
    for line in result.lines:
        print(line)
    if not args.dry_run:
        print(f"deleted {result.deleted} object(s), aborted {result.aborted_uploads} stale upload(s)")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _cmd_restore(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.context import open_repository
    from workers.engines.base import RestoreGoal
    from workers.engines.registry import engine_for

    settings = _settings(args)
    engine = engine_for(settings.target(args.target))
    at = _parse_at(args.at)
    goal = RestoreGoal(at=at, xid=args.xid, lsn=args.lsn, name=args.name)
    relocate = _parse_tablespaces(args.tablespace)
    into = args.into.absolute()  # the server runs in another folder: print and pass no relative path
    repo = open_repository(settings)
    out = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    plan = engine.plan_restore(repo, at, goal=goal)
    base = plan.base
    for skipped in plan.skipped:
        say(f"WARNING: left out a damaged backup: {skipped}")
    diff = f" + differential {plan.diff['backup_id']}" if plan.diff else ""
    window = ", ".join(f"{a:%Y-%m-%dT%H:%M:%SZ} .. {b:%Y-%m-%dT%H:%M:%SZ}" for a, b in plan.window.intervals)
    asked = {"at": args.at, "transaction": args.xid, "LSN": args.lsn, "restore point": args.name}
    asked_for = next((f"{k} {v}" for k, v in asked.items() if v is not None), "the latest archived moment")
    say(
        f"restoring {args.target} to {asked_for}: full {base['backup_id']} "
        f"({_mib(base['plain_size'])}){diff} + {plan.log_files} WAL file(s); restorable: {window}"
    )
    say(f"recovery stops at {plan.stop.what}")
    result = engine.restore(
        repo,
        plan,
        into,
        start=args.start,
        port=args.port,
        relocate=relocate,
        on_progress=lambda line: say(f"  {line}"),
    )
    for part in result.relocated:
        say(f"{part.what} restored into {part.into}")
    if args.json:
        print(json.dumps(_restore_json(args, plan, result)))
    elif args.start:
        reached = (
            f"{result.reached:%Y-%m-%dT%H:%M:%S.%fZ}"
            if result.reached
            else "none: no commit after the base backup was archived"
        )
        print(
            f"recovered and running on port {result.port}; stopped as planned at {result.stop}; "
            f"last transaction replayed at {reached}\n"
            f"it accepts local connections only, through its socket folder (as root or the server's "
            f"user): psql -h {result.socket_dir} -p {result.port} -U postgres"
        )
    else:
        print(
            f"restored and verified into {into} (WAL in {result.log_dir}). Start it as the postgres "
            f"user with: pg_ctl -D {into} start; it recovers, then promotes. It accepts local "
            "connections only (see its pg_hba.conf)"
        )
    return 0


def _restore_json(args: argparse.Namespace, plan: Any, result: Any) -> dict[str, Any]:
    """What `restore --json` prints: the plan followed and where recovery stopped (with --start: the
    server's port, its socket folder and the last transaction replayed)."""

    def moment(value: datetime | None) -> str | None:
        return f"{value:%Y-%m-%dT%H:%M:%S.%fZ}" if value else None

    return {
        "target": args.target,
        "into": str(result.into),
        "log_dir": str(result.log_dir),
        "full": plan.base["backup_id"],
        "diff": plan.diff["backup_id"] if plan.diff else None,
        "log_files": plan.log_files,
        "window": [[moment(a), moment(b)] for a, b in plan.window.intervals],
        "skipped": list(plan.skipped),
        "recovery_target": moment(result.recovery_target),
        "stops_at": result.stop or plan.stop.what,
        "started": bool(args.start),
        "port": result.port,
        "socket_dir": str(result.socket_dir) if result.socket_dir else None,
        "reached": moment(result.reached),
        "relocated": [{"what": part.what, "into": str(part.into)} for part in result.relocated],
    }


def _cmd_mark(args: argparse.Namespace, _extra: list[str]) -> int:
    import time

    from workers.context import open_repository
    from workers.engines.base import RestoreGoal, Unreachable
    from workers.engines.registry import engine_for

    if not args.name or len(args.name.encode()) > 63:
        raise _usage("NAME: give a restore point name of 1 to 63 bytes")
    settings = _settings(args)
    engine = engine_for(settings.target(args.target))
    lsn = engine.mark(args.name)
    print(f"restore point {args.name!r} created on {args.target} at LSN {lsn}", flush=True)
    repo = open_repository(settings)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            engine.plan_restore(repo, None, goal=RestoreGoal(name=args.name))
        except Unreachable:
            if time.monotonic() >= deadline:
                print(
                    f"it is not archived yet after {args.wait:.0f}s: check that `deskvault wal-stream` "
                    f"runs for {args.target} (deskvault status)",
                    file=sys.stderr,
                )
                return 1
            time.sleep(1)
            continue
        print(f"archived: restore it with deskvault restore --target {args.target} --name {args.name!r}")
        return 0


def _parse_tablespaces(pairs: list[str]) -> dict[str, Path]:
    mapping: dict[str, Path] = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise _usage(f"--tablespace {pair!r}: expected OID_OR_NAME_OR_OLD_PATH=NEW_PATH")
        mapping[old] = Path(new).absolute()
    return mapping


def _cmd_dlq_list(args: argparse.Namespace, _extra: list[str]) -> int:
    from deskvault.dlq import list_dead_letters

    letters = list_dead_letters(_settings(args).broker.url, args.pool, args.limit)
    if args.json:
        print(json.dumps([d.as_dict() for d in letters], indent=2))
        return 0
    if not letters:
        print(f"no dead letters in {args.pool}")
        return 0
    for d in letters:
        print(f"{d.message_id}  {d.event_type or '(not an event)'}  {d.idempotency_key or ''}")
        print(f"    reason: {d.reason}")
    return 0


def _cmd_dlq_act(args: argparse.Namespace, _extra: list[str]) -> int:
    from deskvault import dlq

    ids = set(args.message_id or ())
    action = dlq.replay if args.verb == "replay" else dlq.drop
    done = action(_settings(args).broker.url, args.pool, lambda d: args.all or d.message_id in ids)
    missing = ids - set(done)
    if args.json:
        print(json.dumps({"pool": args.pool, args.verb: sorted(done), "not_found": sorted(missing)}))
        return 1 if missing else 0
    print(f"{'replayed' if args.verb == 'replay' else 'dropped'} {len(done)} dead letter(s) of {args.pool}")
    if missing:
        print(f"not found in {args.pool}'s dead letters: {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    return 0


def _parse_at(text: str | None) -> datetime | None:
    """The --at option as a UTC moment (None when not given); a usage error names the option."""
    from messages.events import parse_timestamp

    if text is None:
        return None
    try:
        return parse_timestamp(text)
    except ValueError as e:
        raise _usage(f"--at: {e}") from None


COMPLETION_SHELLS = ("bash", "zsh", "tcsh")


def _cmd_completion(args: argparse.Namespace, _extra: list[str]) -> int:
    import shtab

    print(shtab.complete(_parser(), shell=args.shell))
    return 0


def _cmd_status(args: argparse.Namespace, _extra: list[str]) -> int:
    from deskvault.status import collect_status, exit_code, render_status

    settings = _settings(args)
    status = collect_status(settings, args.prometheus or settings.metrics.prometheus_url)
    print(json.dumps(status, indent=2, default=str) if args.json else render_status(status))
    return exit_code(status)


def _cmd_init(args: argparse.Namespace, _extra: list[str]) -> int:
    from deskvault.init import run_init

    run_init(_settings(args), dry_run=args.dry_run, say=print)
    print("next: `deskvault check`" if not args.dry_run else "(dry run: nothing was changed)")
    return 0


def _cmd_check(args: argparse.Namespace, _extra: list[str]) -> int:
    from deskvault.check import run_checks
    from deskvault_core.checks import FAIL, Check, exit_code
    from deskvault_core.errors import ConfigError

    try:
        settings = _settings(args)
        for name in args.target or ():
            settings.target(name)
    except ConfigError as e:
        checks = [Check("configuration", FAIL, str(e))]
    else:
        prometheus = args.prometheus or settings.metrics.prometheus_url
        checks = run_checks(settings, targets=args.target, prometheus_url=prometheus)
    code = exit_code(checks)
    if args.json:
        print(json.dumps({"checks": [c.as_json() for c in checks], "exit_code": code}, indent=2))
    else:
        print("\n".join(c.line() for c in checks))
    return code


def _cmd_migrate(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.context import open_ledger

    version = open_ledger(_settings(args)).migrate()
    print(f"control database at schema version {version}")
    return 0


def _cmd_keys_create(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.repository.keyring import Keyring

    path = Path(_settings(args).repository.key_file)
    keyring = Keyring.create(path)
    print(
        f"created {path} with key {keyring.active_id}; keep a copy somewhere safe: without it no "
        "backup can be read"
    )
    return 0


def _cmd_keys_rotate(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.repository.keyring import Keyring

    path = Path(_settings(args).repository.key_file)
    key_id = Keyring.rotate(path)
    print(f"{path}: new active key {key_id}; older keys stay for reading existing backups")
    return 0


def _key_usage(settings: Any) -> Any:
    """Every object's header read (progress on stderr for long scans): a `key_usage.KeyUsage`."""
    from workers.context import open_repository
    from workers.repository import key_usage

    store = open_repository(settings).store
    return key_usage.scan(
        store, on_progress=key_usage.ScanProgress(lambda line: print(line, file=sys.stderr, flush=True))
    )


def _tenant_keys_by_kek(settings: Any) -> dict[str, int]:
    """How many legacy tenant keys in the control database each key-encryption key wraps."""
    from workers.context import open_ledger

    ledger = open_ledger(settings)
    try:
        return ledger.legacy_tenant_keys_by_kek()
    finally:
        ledger.close()


def _cmd_keys_list(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.repository.keyring import Keyring

    settings = _settings(args)
    path = Path(settings.repository.key_file)
    keyring = Keyring.load(path)
    usage = _key_usage(settings)
    tenant_error = None
    try:
        tenant_keys: dict[str, int] | None = _tenant_keys_by_kek(settings)
    except DeskvaultError as e:
        tenant_keys, tenant_error = None, str(e)
    keys = []
    for key_id in keyring.key_ids:
        used = usage.of(key_id)
        wrapped = None if tenant_keys is None else tenant_keys.get(key_id, 0)
        keys.append(
            {
                "id": key_id,
                "active": key_id == keyring.active_id,
                "objects": used.objects,
                "stored_bytes": used.stored_bytes,
                "areas": dict(sorted(used.areas.items())),
                "tenant_keys": wrapped,
                "in_use": key_id == keyring.active_id or bool(used.objects) or wrapped != 0,
            }
        )
    # Key ids that headers name but the file does not hold: tenant keys (each kept in the key store,
    # wrapped by a key of this file) or a key-encryption key missing from it, whose objects cannot be read.
    others = [
        {
            "id": key_id,
            "kind": "tenant key" if key_id.startswith("tenant-") else "missing from the key file",
            "objects": used.objects,
            "stored_bytes": used.stored_bytes,
            "areas": dict(sorted(used.areas.items())),
        }
        for key_id, used in sorted(usage.by_key.items())
        if key_id not in keyring.key_ids
    ]
    unreadable = [{"key": u.key, "reason": u.reason} for u in usage.unreadable]
    if args.json:
        document = {
            "key_file": str(path),
            "active": keyring.active_id,
            "objects": usage.objects,
            "keys": keys,
            "other_key_ids": others,
            "unreadable": unreadable,
            "tenant_keys_error": tenant_error,
        }
        print(json.dumps(document, indent=2))
        return 0
    print(f"key file {path}: {len(keys)} key(s), {usage.objects} object(s) in the repository")
    for k in keys:
        areas = ", ".join(f"{area} {n}" for area, n in k["areas"].items()) or "-"
        wrapped = "unknown" if k["tenant_keys"] is None else str(k["tenant_keys"])
        state = "active" if k["active"] else ("in use" if k["in_use"] else "unused")
        print(
            f"  {k['id']}  {state:<7} objects {k['objects']} ({_mib(k['stored_bytes'])}; {areas}), "
            f"tenant keys {wrapped}"
        )
    for o in others:
        areas = ", ".join(f"{area} {n}" for area, n in o["areas"].items())
        print(f"  {o['id']}  ({o['kind']}) objects {o['objects']} ({_mib(o['stored_bytes'])}; {areas})")
    if tenant_error:
        print(f"tenant keys: unknown, the control database could not be read: {tenant_error}")
    if unreadable:
        print(f"unreadable: {len(unreadable)} object(s) whose header names no key:")
        for u in unreadable:
            print(f"  {u['key']}: {u['reason']}")
    unused = [k["id"] for k in keys if not k["in_use"]]
    if unused and not unreadable and not tenant_error:
        print(f"unused, can be retired: {', '.join(unused)} (deskvault keys retire KEY)")
    return 0


def _cmd_keys_retire(args: argparse.Namespace, _extra: list[str]) -> int:
    from workers.repository import key_usage
    from workers.repository.keyring import Keyring, check_retirable

    settings = _settings(args)
    path = Path(settings.repository.key_file)
    keyring = Keyring.load(path)
    key_id = args.key_id
    # Checked up front, so an impossible request costs no scan (retire checks again, under the lock).
    check_retirable(path, keyring.key_ids, keyring.active_id, key_id)
    usage = _key_usage(settings)
    try:
        tenant_keys = _tenant_keys_by_kek(settings).get(key_id, 0)
    except DeskvaultError as e:
        raise DeskvaultError(
            f"key {key_id!r} stays in the key file: the control database's tenant keys, which it may "
            f"wrap, could not be checked ({e})"
        ) from None
    refusal = key_usage.retire_refusal(usage, key_id, tenant_keys)
    if refusal is not None:
        raise DeskvaultError(refusal)
    Keyring.retire(path, key_id)
    print(
        f"retired key {key_id} from {path}: none of the {usage.objects} object(s) in the repository and no "
        "tenant key uses it. Copy the key file to every host that runs deskvault; keep the old copy "
        "wherever a bucket version or a backup of the repository it wrapped may still be restored"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
