"""The scheduler's /healthz: 200 while ticks finish, 503 once none has for `stale_after`; /metrics too."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from support import Clock, free_port

from producers.heartbeat import Heartbeat


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_healthz_fails_once_no_tick_has_finished_for_too_long_and_metrics_say_when() -> None:
    clock = Clock(1_000_000.0)  # seconds, as time.time() gives them
    heartbeat = Heartbeat(stale_after=300, clock=clock)
    port = free_port()
    heartbeat.serve("127.0.0.1", port)

    # A scheduler just started is healthy before its first tick
    assert _get(port, "/healthz")[0] == 200
    # A tick that failed still shows the loop alive, and is counted
    clock.now += 200
    heartbeat.beat(ok=False)
    clock.now += 250
    assert _get(port, "/healthz") == (200, "last tick finished 250 s ago\n")
    # No tick for longer than the limit: unhealthy, saying why
    clock.now += 100
    status, why = _get(port, "/healthz")
    assert status == 503 and "no scheduler tick has finished for 350 s (limit 300 s)" in why
    # A tick again: healthy again
    heartbeat.beat(ok=True)
    assert _get(port, "/healthz")[0] == 200

    status, metrics = _get(port, "/metrics")
    assert status == 200
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert samples["deskvault_scheduler_last_tick_timestamp_seconds"] == clock.now
    assert samples["deskvault_scheduler_tick_failures_total"] == 1
    assert samples["deskvault_build_info"] == 1
