"""`deskvault status`: is every target protected right now, and are the pools keeping up?

Read straight from the sources, so it works when no metrics server does: the repository (how recent the
archived WAL is: the live RPO), the ledger (newest backups, drills, running and failed jobs, purges) and
RabbitMQ (queue depths, consumers, dead letters). Waits and failure rates exist only as metrics: with a
Prometheus URL (`--prometheus` or [metrics] prometheus_url) they are added from it.
"""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pika.exceptions
from prometheus_client.parser import text_string_to_metric_families

from deskvault_core.config import Settings
from deskvault_core.errors import DeskvaultError
from messages.topology import POOLS
from workers.context import open_ledger, open_repository
from workers.engines.registry import engine_for
from workers.queues import QueueDepth, queue_depths

KINDS = ("full", "diff", "log")
WARN, FAIL = "WARN", "FAIL"
WAL_PROBLEM_METRIC = "deskvault_wal_stream_problem"
# What status reads from Prometheus: name -> (the label results are keyed by, query).
PROMETHEUS_QUERIES = {
    "wait_p99": (
        "pool",
        "histogram_quantile(0.99, sum by (pool, le) (rate(deskvault_event_wait_seconds_bucket[15m])))",
    ),
    "failures_1h": ("pool", "sum by (pool) (increase(deskvault_events_failed_total[1h]))"),
    "wal_archived": ("target", "max by (target) (deskvault_wal_archived_timestamp_seconds)"),
}


def collect_status(settings: Settings, prometheus_url: str = "") -> dict[str, Any]:
    now = datetime.now(UTC)
    warnings: list[str] = []
    ledger = open_ledger(settings)
    newest = ledger.newest_backups()
    drills = ledger.newest_drills()
    rates = _from_prometheus(prometheus_url, warnings) if prometheus_url else {}
    archived_until, problems = live_wal(settings, prometheus_url, rates.get("wal_archived"), warnings)
    uploads = _newest_wal_uploads(settings, warnings)
    targets = {}
    for name in sorted(settings.targets):
        archived = archived_until.get(name)
        upload = uploads.get(name)
        drill = drills.get(name)
        targets[name] = {
            # The live RPO, as `deskvault wal-stream` reports it; None when no streamer answers.
            "rpo_seconds": max(0, int(now.timestamp() - archived)) if archived else None,
            # Why the live RPO cannot move, as the streamer saw it; None while it moves.
            "wal_problem": problems.get(name),
            "newest_wal_upload": _iso(upload),
            "newest": {kind: _iso(newest.get((name, kind))) for kind in KINDS},
            "age_seconds": {
                kind: _seconds(now - newest[(name, kind)]) if (name, kind) in newest else None
                for kind in KINDS
            },
            "drill": None
            if drill is None
            else {
                "finished_at": _iso(drill["finished_at"]),
                "passed": drill["succeeded"],
                "passed_at": _iso(drill["passed_at"]),
            },
        }
    running = ledger.running_jobs()
    failed_recently = ledger.failed_jobs_since(now - timedelta(days=1))
    queues = _queues(settings.broker.url, warnings)
    pools = {}
    for pool in POOLS:
        ready, consumers, dead = queues.get(pool, (None, None, None))
        pools[pool] = {
            "ready": ready,
            "consumers": consumers,
            "dead_letters": dead,
            "running": running.get(pool, 0),
            "failed_24h": failed_recently.get(pool, 0),
            "wait_p99_seconds": rates.get("wait_p99", {}).get(pool),
            "failures_1h": rates.get("failures_1h", {}).get(pool),
        }
    purges = ledger.purge_state(now)
    status = {
        "at": _iso(now),
        "targets": targets,
        "pools": pools,
        "purges": {
            "pending": purges["pending"],
            "on_legal_hold": purges["held"],
            "due": purges["due"],
            "oldest_due": _iso(purges["oldest_due"]),
        },
        "warnings": warnings,
    }
    status["attention"] = [{"level": level, "what": what} for level, what in attention(status)]
    return status


def attention(status: dict[str, Any]) -> list[tuple[str, str]]:
    """What needs an operator, each as (WARN or FAIL, what): a failed drill or a live RPO that cannot
    move is a FAIL (the next restore may not reach what it should); an unknown RPO, a drill never run,
    dead letters, failed jobs and what could not be read are WARNs."""
    found = []
    for name, t in status["targets"].items():
        if t["drill"] is not None and not t["drill"]["passed"]:
            verify = f"`deskvault backups verify --target {name}`"
            found.append(
                (FAIL, f"{name}: the newest restore drill failed; run {verify} (ops/runbooks/alerts.md)")
            )
        elif t["drill"] is None:
            found.append((WARN, f"{name}: no restore drill has run yet"))  # drills are weekly
        if t["wal_problem"]:
            found.append((FAIL, f"{name}: the live RPO is stuck: {t['wal_problem']}"))
        elif t["rpo_seconds"] is None:
            found.append((WARN, f"{name}: the live RPO is unknown: no `deskvault wal-stream` answers"))
    for pool, p in status["pools"].items():
        if p["dead_letters"]:
            dlq = f"`deskvault dlq list --pool {pool}`"
            found.append((WARN, f"pool {pool}: {p['dead_letters']} dead letter(s); run {dlq}"))
        if p["failed_24h"]:
            found.append((WARN, f"pool {pool}: {p['failed_24h']} failed job(s) in the last 24 hours"))
    found += [(WARN, w) for w in status["warnings"]]
    return found


def exit_code(status: dict[str, Any]) -> int:
    """0 nothing needs attention, 1 a WARN, 2 a FAIL (as `deskvault check`)."""
    levels = {a["level"] for a in status["attention"]}
    return 2 if FAIL in levels else 1 if WARN in levels else 0


def live_wal(
    settings: Settings, prometheus_url: str, archived: dict[str, float] | None, warnings: list[str]
) -> tuple[dict[str, float], dict[str, str]]:
    """(target -> up to when its WAL is safe in the bucket, target -> why that cannot move), from
    Prometheus when it has them (`archived`: already queried, None: ask it here), else straight from a
    `deskvault wal-stream` serving metrics where this config says; empty when neither answers."""
    if prometheus_url and archived is None:
        label, query = PROMETHEUS_QUERIES["wal_archived"]
        try:
            archived = {
                r["metric"].get(label, ""): float(r["value"][1])
                for r in _prometheus_query(prometheus_url, query)
            }
        except (OSError, ValueError, KeyError) as e:
            warnings.append(f"Prometheus at {prometheus_url} could not be queried ({type(e).__name__})")
    if prometheus_url and archived:
        return archived, _wal_problems(prometheus_url, warnings)
    streamed = _wal_stream_samples(settings)
    return _by_target(streamed, "deskvault_wal_archived_timestamp_seconds"), _problems_in(streamed)


def _newest_wal_uploads(settings: Settings, warnings: list[str]) -> dict[str, datetime]:
    """target -> when its newest WAL object reached the repository (an idle database uploads none)."""
    found = {}
    try:
        repo = open_repository(settings)
        for name, target in settings.targets.items():
            archive = engine_for(target).log_archive(repo, [])  # upload times need no manifest
            newest = max((f.uploaded_at for f in archive.files), default=None)
            if newest is not None:
                found[name] = newest
    except DeskvaultError as e:
        warnings.append(f"repository: {e}")
    return found


def _wal_stream_samples(settings: Settings) -> list[Any]:
    """The metrics of a `deskvault wal-stream` serving where this config says; [] when none answers."""
    url = f"http://{settings.metrics.host}:{settings.wal.metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            text = response.read().decode()
    except OSError:
        return []
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def _by_target(samples: list[Any], name: str) -> dict[str, float]:
    return {s.labels["target"]: s.value for s in samples if s.name == name}


def _problems_in(samples: list[Any]) -> dict[str, str]:
    return {
        s.labels["target"]: s.labels["problem"]
        for s in samples
        if s.name == WAL_PROBLEM_METRIC and s.value == 1
    }


def _wal_problems(url: str, warnings: list[str]) -> dict[str, str]:
    """target -> why its live RPO cannot move, from Prometheus (every streamer it scrapes)."""
    try:
        result = _prometheus_query(url, WAL_PROBLEM_METRIC + " == 1")
    except (OSError, ValueError, KeyError) as e:
        warnings.append(f"Prometheus at {url} could not be queried for WAL problems ({type(e).__name__})")
        return {}
    return {r["metric"].get("target", ""): r["metric"].get("problem", "") for r in result}


def _prometheus_query(url: str, query: str) -> list[dict[str, Any]]:
    """The result vector of an instant query."""
    address = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(address, timeout=10) as response:
        return json.load(response)["data"]["result"]


def _queues(url: str, warnings: list[str]) -> dict[str, QueueDepth]:
    try:
        return queue_depths(url, POOLS)
    except (pika.exceptions.AMQPError, OSError) as e:
        warnings.append(f"RabbitMQ unreachable ({type(e).__name__}): check [broker] url and that it runs")
        return {}


def _from_prometheus(url: str, warnings: list[str]) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = {}
    for key, (label, query) in PROMETHEUS_QUERIES.items():
        try:
            result = _prometheus_query(url, query)
        except (OSError, ValueError, KeyError) as e:
            warnings.append(
                f"Prometheus at {url} could not be queried ({type(e).__name__}); waits are left out"
            )
            return {}
        found[key] = {
            r["metric"].get(label, ""): float(r["value"][1])
            for r in result
            if not math.isnan(float(r["value"][1]))
        }
    return found


def render_status(status: dict[str, Any]) -> str:
    lines = [f"deskvault status at {status['at']}", ""]
    lines.append(f"{'TARGET':<16} {'RPO':>7} {'FULL':>8} {'DIFF':>8} {'LOG':>8}  RESTORE DRILL")
    for name, t in status["targets"].items():
        ages = t["age_seconds"]
        lines.append(
            f"{name:<16} {_span(t['rpo_seconds']):>7} {_span(ages['full']):>8} {_span(ages['diff']):>8} "
            f"{_span(ages['log']):>8}  {_drill(t['drill'], status['at'])}"
        )
    lines.append(
        "(ages since each; RPO: time since the WAL was last safe, as `deskvault wal-stream` reports it)"
    )
    for name, t in status["targets"].items():
        if t["wal_problem"]:
            lines.append(f"{name}: the live RPO is stuck: {t['wal_problem']} (see the wal-stream log)")
    lines += [
        "",
        f"{'POOL':<10} {'READY':>6} {'CONSUMERS':>9} {'RUNNING':>7} {'DEAD':>5} {'FAILED 24H':>10} "
        f"{'WAIT P99':>8} {'FAILURES 1H':>11}",
    ]
    for pool, p in status["pools"].items():
        wait = p["wait_p99_seconds"]
        lines.append(
            f"{pool:<10} {_n(p['ready']):>6} {_n(p['consumers']):>9} {p['running']:>7} "
            f"{_n(p['dead_letters']):>5} {p['failed_24h']:>10} {_span(wait, precise=True):>8} "
            f"{_n(p['failures_1h']):>11}"
        )
    purges = status["purges"]
    due = f", oldest due since {purges['oldest_due']}" if purges["oldest_due"] else ""
    lines += [
        "",
        f"expired tenants: {purges['pending']} kept until their purge date, {purges['due']} due for purge"
        f"{due}, {purges['on_legal_hold']} on legal hold",
    ]
    lines += [f"WARNING: {w}" for w in status["warnings"]]
    needs = [a for a in status["attention"] if a["what"] not in status["warnings"]]
    lines += [""] * bool(needs) + [f"{a['level']}: {a['what']}" for a in needs]
    if any((p["dead_letters"] or 0) > 0 for p in status["pools"].values()):
        lines.append(
            "dead letters wait: list them with `deskvault dlq list --pool P` "
            "(ops/runbooks/replay-dead-letters.md)"
        )
    return "\n".join(lines)


def _drill(drill: dict[str, Any] | None, at: str) -> str:
    if drill is None:
        return "never run"
    age = _span(_seconds(datetime.fromisoformat(at) - datetime.fromisoformat(drill["finished_at"])))
    return f"passed {age} ago" if drill["passed"] else f"FAILED {age} ago"


def _n(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _span(seconds: float | None, *, precise: bool = False) -> str:
    """Short human durations: 45s, 12m, 3h05m, 2d04h."""
    if seconds is None:
        return "-"
    if precise and seconds < 10:
        return f"{seconds:.2f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _seconds(delta: timedelta) -> int:
    return max(0, int(delta.total_seconds()))


def _iso(moment: datetime | None) -> str | None:
    return f"{moment:%Y-%m-%dT%H:%M:%SZ}" if moment is not None else None
