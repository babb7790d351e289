"""The scheduler's liveness for a service manager: `/healthz` answers 503 once no tick has finished for
a while (a hung scheduler publishes nothing, and nothing else would say so until backups are missed),
and `/metrics` when the last tick finished and how many failed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Gauge, make_wsgi_app

from deskvault_core.build_info import BuildInfo

LAST_TICK = Gauge(
    "deskvault_scheduler_last_tick_timestamp_seconds",
    "When the scheduler last finished a tick, whether or not it could publish what was due",
)
TICK_FAILURES = Counter(
    "deskvault_scheduler_tick_failures_total", "Scheduler ticks that failed (the next tick retries them)"
)
# /healthz fails once no tick has finished for this long: many tick intervals (20 s), so a slow broker
# or control database is not taken for a hung scheduler.
STALE_AFTER = 300.0


class Heartbeat:
    def __init__(self, stale_after: float = STALE_AFTER, clock: Callable[[], float] = time.time) -> None:
        self.stale_after = stale_after
        self.clock = clock
        self.last = clock()  # a scheduler just started has until stale_after for its first tick
        TICK_FAILURES.inc(0)

    def beat(self, ok: bool) -> None:
        """A tick finished; `ok`: it published what was due."""
        self.last = self.clock()
        LAST_TICK.set(self.last)
        if not ok:
            TICK_FAILURES.inc()

    def health(self) -> tuple[bool, str]:
        age = self.clock() - self.last
        if age > self.stale_after:
            return False, f"no scheduler tick has finished for {age:.0f} s (limit {self.stale_after:.0f} s)"
        return True, f"last tick finished {age:.0f} s ago"

    def serve(self, host: str, port: int) -> None:
        """Serve /healthz and /metrics on host:port from a daemon thread."""
        REGISTRY.register(BuildInfo())
        metrics = make_wsgi_app(REGISTRY)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/healthz":
                return metrics(environ, start_response)
            healthy, why = self.health()
            start_response(
                "200 OK" if healthy else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [why.encode() + b"\n"]

        server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="scheduler-health", daemon=True).start()


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck client never holds up the scheduler's stop


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a probe every few seconds is not news
