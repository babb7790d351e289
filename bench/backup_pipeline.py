"""Benchmark: a full backup of a >= 1 GiB PostgreSQL target through a real `deskvault worker`.

Reports the worker's peak RSS (goal < 256 MiB) and the pipeline's throughput as a ratio to the slowest
stage run alone on the same data in the same run (goal >= 0.7). The stages alone:
  read      pg_basebackup's tar stream, discarded
  compress  zstd of that tar (from a copy on disk, so the read is not counted twice)
  encrypt   AES-256-GCM of the compressed bytes
  upload    S3 multipart upload of the encrypted bytes (raw boto3, the repository's part size and threads)
Every rate is in plaintext bytes (the size of the tar) per second, so the stages compare directly. The
stages are `bench/stages.py`'s (shared with bench/vs_pgbackrest.py); each starts with the page cache
dropped (as root), then holding its input, and the read starts from a dropped cache.

Run: .venv/bin/python bench/backup_pipeline.py [--scale 220] [--zstd-level 3] [--zstd-threads 0] [--keep]
Needs the services the tests use (RabbitMQ, PostgreSQL on 127.0.0.1:5432) and the venv's `weed`: the
store is `bench/seaweed.py`'s (the shared SeaweedFS if it serves HTTPS, else one of the run's own).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import seaweed, stages  # noqa: E402
from bench.common import (  # noqa: E402
    BenchServices,
    backup_worker_command,
    drop_caches,
    log,
    publish_full_backup,
    raw_s3,
)
from deskvault.local.demo_data import helpdesk_sql  # noqa: E402
from workers.context import open_repository  # noqa: E402
from workers.engines.postgresql.cluster import PgCluster, free_port  # noqa: E402
from workers.repository import catalog  # noqa: E402
from workers.repository.keyring import Keyring  # noqa: E402

MIB = 2**20


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=220, help="helpdesk data scale (220 ~ 1.06 GiB cluster)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch cluster and files")
    parser.add_argument("--zstd-level", type=int, default=3)
    parser.add_argument("--zstd-threads", type=int, default=0, help="0 = compress in the worker's thread")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="deskvault-bench-"))
    scratch.chmod(0o755)
    cluster = PgCluster(scratch / "pg", free_port(), tcp=True)
    services = BenchServices("bench").__enter__()
    s3 = None
    try:
        s3 = seaweed.start(scratch)
        log(f"creating a target cluster with helpdesk data at scale {args.scale} (takes a few minutes)")
        cluster.initdb()
        cluster.start()
        cluster.psql("CREATE DATABASE bigco")
        t0 = time.monotonic()
        cluster.psql(helpdesk_sql("bigco", scale=args.scale), "bigco", timeout=3600)
        cluster.psql("CHECKPOINT")
        size = int(cluster.psql("SELECT sum(pg_database_size(datname)) FROM pg_database").strip())
        log(f"target holds {size / MIB:.0f} MiB (generated in {time.monotonic() - t0:.0f}s)")

        settings = services.settings(
            scratch,
            target="bench",
            conninfo=cluster.conninfo,
            prefix="run",
            extra=f"zstd_level = {args.zstd_level}\nzstd_threads = {args.zstd_threads}",
            s3=s3.tls_endpoint,
            ca_bundle=s3.ca_bundle,
        )
        alone = _stages_alone(settings, cluster, scratch)
        pipeline = _pipeline(settings)
        _report(settings, size, alone, pipeline)
        return 0
    finally:
        if s3 is not None:
            s3.stop()
        if not args.keep:
            cluster.destroy()
            shutil.rmtree(scratch, ignore_errors=True)
        services.__exit__(None, None, None)


def _stages_alone(settings, cluster: PgCluster, scratch: Path) -> dict[str, float]:
    """Seconds each stage takes on its own, over the same backup (`bench/stages.py`)."""
    tar = scratch / "base.tar"
    cmd = [
        "/usr/lib/postgresql/15/bin/pg_basebackup",
        "-d",
        cluster.conninfo,
        "-D",
        "-",
        "-F",
        "tar",
        "-X",
        "fetch",
        "-c",
        "fast",
    ]
    drop_caches()
    t = time.monotonic()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    read_s = time.monotonic() - t
    log(f"read alone: {read_s:.1f}s")
    with tar.open("wb") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.DEVNULL, check=True)
    tar_size = tar.stat().st_size

    r = settings.repository
    item = stages.Item("stage-upload/base.tar.dv", tar, tar_size)
    compress_s = stages.compress([item], r.zstd_level, r.zstd_threads)
    compressed_mib = item.compressed.stat().st_size / MIB
    log(f"compress alone: {compress_s:.1f}s ({tar_size / MIB:.0f} -> {compressed_mib:.0f} MiB)")
    encrypt_s = stages.encrypt([item], Keyring.load(Path(r.key_file)))
    log(f"encrypt alone: {encrypt_s:.1f}s")
    prefix = r.prefix.rstrip("/") + "/" if r.prefix else ""
    upload_s = stages.upload(
        [item],
        raw_s3(settings),
        r.bucket,
        prefix,
        part_size=r.part_size_mib * MIB,
        upload_threads=r.upload_threads,
    )
    log(f"upload alone: {upload_s:.1f}s ({item.sealed.stat().st_size / MIB:.0f} MiB)")
    return {
        "tar_bytes": tar_size,
        "read": read_s,
        "compress": compress_s,
        "encrypt": encrypt_s,
        "upload": upload_s,
    }


def _pipeline(settings) -> dict[str, float]:
    """A real worker process takes the backup from a published event; its peak RSS is measured."""
    publish_full_backup(settings, "bench")
    log("pipeline: deskvault worker --pool backup --burst")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    worker = backup_worker_command(settings)
    subprocess.run(worker, check=True)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    manifest = catalog.newest_full(open_repository(settings), "bench")
    seconds = (
        datetime.fromisoformat(manifest["finished_at"]) - datetime.fromisoformat(manifest["started_at"])
    ).total_seconds()
    return {
        "seconds": seconds,
        "plain_bytes": manifest["plain_size"],
        "stored_bytes": manifest["stored_size"],
        "peak_rss_mib": peak_kib / 1024,
        "rss_before_mib": before / 1024,
    }


def _report(settings, db_bytes: int, stages: dict[str, float], pipeline: dict[str, float]) -> None:
    tar = stages["tar_bytes"]
    rates = {name: tar / stages[name] / MIB for name in ("read", "compress", "encrypt", "upload")}
    slowest = min(rates, key=rates.__getitem__)
    pipe_rate = pipeline["plain_bytes"] / pipeline["seconds"] / MIB
    result = {
        "database_mib": round(db_bytes / MIB),
        "backup_mib": round(pipeline["plain_bytes"] / MIB),
        "stored_mib": round(pipeline["stored_bytes"] / MIB),
        "stage_mib_per_s": {k: round(v, 1) for k, v in rates.items()},
        "slowest_stage": slowest,
        "pipeline_mib_per_s": round(pipe_rate, 1),
        "pipeline_vs_slowest_stage": round(pipe_rate / rates[slowest], 2),
        "worker_peak_rss_mib": round(pipeline["peak_rss_mib"], 1),
        "zstd": {"level": settings.repository.zstd_level, "threads": settings.repository.zstd_threads},
        "goals": {"pipeline_vs_slowest_stage": ">= 0.7", "worker_peak_rss_mib": "< 256"},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
