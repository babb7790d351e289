"""`deskvault worker`: run pools as N processes x M threads, serve their metrics, stop cleanly.

The parent process serves the metrics of all its children on one port (prometheus-client's multiprocess
mode) and forwards Ctrl-C / SIGTERM; each child runs one dramatiq Worker. In burst mode a child exits
once its pools' queues hold no ready message and nothing is in progress (retries waiting out a backoff
stay in RabbitMQ for the next run).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass

from messages.topology import POOLS, delay_queue

log = logging.getLogger(__name__)

# Burst mode: how often and how many times in a row the pools must look idle before a child exits.
IDLE_CHECK_SECONDS = 0.5
IDLE_CHECKS_NEEDED = 4
# On SIGTERM, running events get this long to finish before they go back to the queue.
DEFAULT_STOP_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class WorkerOptions:
    config: str | None
    pools: tuple[str, ...]
    processes: int = 1
    threads: int = 4
    burst: bool = False
    stop_timeout_seconds: int = DEFAULT_STOP_TIMEOUT_SECONDS
    metrics_host: str | None = None
    metrics_port: int | None = None
    log_level: str = "INFO"


def run(options: WorkerOptions) -> int:
    unknown = set(options.pools) - set(POOLS)
    if unknown:
        raise ValueError(f"--pool: unknown pool {sorted(unknown)[0]!r} (pools: {', '.join(POOLS)})")
    metrics_dir = tempfile.mkdtemp(prefix="deskvault-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        if options.metrics_port is not None:
            from deskvault_core.config import load_settings
            from workers.metrics import serve_multiprocess_metrics
            from workers.state_metrics import state_collector

            collector = state_collector(load_settings(options.config), options.pools)
            serve_multiprocess_metrics(options.metrics_host or "127.0.0.1", options.metrics_port, collector)
            log.info(
                "metrics for pools %s on http://%s:%d/metrics",
                ",".join(options.pools),
                options.metrics_host or "127.0.0.1",
                options.metrics_port,
            )
        return _supervise(options)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(options: WorkerOptions) -> int:
    # spawn: each child imports prometheus-client afresh, after PROMETHEUS_MULTIPROC_DIR is set.
    ctx = multiprocessing.get_context("spawn")
    children = [
        ctx.Process(target=_child, args=(options, i, os.getpid()), name=f"{'+'.join(options.pools)}-{i}")
        for i in range(options.processes)
    ]
    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        if not stopping.is_set():
            log.info("stopping workers (signal %d); in-progress jobs finish or return to the queue", signum)
            stopping.set()
            for child in children:
                if child.pid and child.is_alive():
                    os.kill(child.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for child in children:
            child.start()
        for child in children:
            child.join()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [child.exitcode or 0 for child in children]
    return max(codes, default=0)


def _child(options: WorkerOptions, index: int, parent: int) -> None:
    from deskvault_core import lifeline

    lifeline.stop_with(parent)  # were the parent killed outright, this process would go on consuming
    from dramatiq import Worker

    from deskvault_core.config import load_settings
    from deskvault_core.errors import DeskvaultError
    from deskvault_core.logs import setup_logging
    from workers import context, metrics
    from workers.actors import build_broker

    setup_logging(options.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into SIGTERM

    try:
        settings = load_settings(options.config)
        context.configure(context.build(settings))
    except DeskvaultError as e:
        log.error("worker %d cannot start: %s", index, e)
        sys.exit(e.exit_code)
    broker, pool_metrics = build_broker(settings)
    metrics.initialize(options.pools, sorted(settings.targets))
    queues = {q for pool in options.pools for q in (pool, delay_queue(pool))}
    worker = Worker(broker, queues=queues, worker_threads=options.threads)
    worker.start()
    log.info("worker %d consuming %s with %d threads", index, ",".join(options.pools), options.threads)
    try:
        idle_checks = 0
        while not stop.wait(IDLE_CHECK_SECONDS):
            if not options.burst:
                continue
            idle = (
                pool_metrics.in_progress == 0
                and worker.work_queue.qsize() == 0
                and all(sum(broker.get_queue_message_counts(pool)[:2]) == 0 for pool in options.pools)
            )
            idle_checks = idle_checks + 1 if idle else 0
            if idle_checks >= IDLE_CHECKS_NEEDED:
                log.info("worker %d: queues empty, burst done", index)
                break
    finally:
        worker.stop(timeout=options.stop_timeout_seconds * 1000)
        broker.close()
