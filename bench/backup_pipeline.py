"""Benchmark: a full backup of a >= 1 GiB PostgreSQL target through a real `deskvault worker`.

Reports the worker's peak RSS (goal < 256 MiB) and the pipeline's throughput as a ratio to the slowest
stage run alone on the same data in the same run (goal >= 0.7). The stages alone:
  read      pg_basebackup's tar stream, discarded
  compress  zstd of that tar (from a copy on disk, so the read is not counted twice)
  encrypt   AES-256-GCM of the compressed bytes
  upload    S3 multipart upload of the encrypted bytes
Every rate is in plaintext bytes (the size of the tar) per second, so the stages compare directly.

Run: .venv/bin/python bench/backup_pipeline.py [--scale 220] [--zstd-level 3] [--zstd-threads 0] [--keep]
Needs the services the tests use (RabbitMQ, PostgreSQL on 127.0.0.1:5432, SeaweedFS via .deskvault).
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

import zstandard  # noqa: E402

from bench.common import BenchServices, backup_worker_command, log, publish_full_backup  # noqa: E402
from deskvault.local.demo_data import helpdesk_sql  # noqa: E402
from workers.context import open_repository  # noqa: E402
from workers.engines.postgresql.cluster import PgCluster, free_port  # noqa: E402
from workers.repository import catalog  # noqa: E402
from workers.repository.crypto import encrypt_stream  # noqa: E402
from workers.repository.keyring import Keyring  # noqa: E402

MIB = 2**20
CHUNK = MIB


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
    try:
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
        )
        stages = _stages_alone(settings, cluster, scratch)
        pipeline = _pipeline(settings)
        _report(settings, size, stages, pipeline)
        return 0
    finally:
        if not args.keep:
            cluster.destroy()
            shutil.rmtree(scratch, ignore_errors=True)
        services.__exit__(None, None, None)


def _stages_alone(settings, cluster: PgCluster, scratch: Path) -> dict[str, float]:
    """Seconds each stage takes on its own, over the same backup."""
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
    t = time.monotonic()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    read_s = time.monotonic() - t
    log(f"read alone: {read_s:.1f}s")
    with tar.open("wb") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.DEVNULL, check=True)
    tar_size = tar.stat().st_size

    r = settings.repository
    compressor = zstandard.ZstdCompressor(level=r.zstd_level, threads=r.zstd_threads)
    compressed_path = scratch / "base.tar.zst"
    with tar.open("rb") as src, compressed_path.open("wb") as dst:
        _warm(tar)
        t = time.monotonic()
        compressor.copy_stream(src, dst, read_size=CHUNK, write_size=CHUNK)
        compress_s = time.monotonic() - t
    compressed_mib = compressed_path.stat().st_size / MIB
    log(f"compress alone: {compress_s:.1f}s ({tar_size / MIB:.0f} -> {compressed_mib:.0f} MiB)")

    keyring = Keyring.load(Path(r.key_file))
    sealed_path = scratch / "base.tar.zst.dv"
    _warm(compressed_path)
    with sealed_path.open("wb") as out:
        t = time.monotonic()
        for piece in encrypt_stream(keyring, _file_chunks(compressed_path)):
            out.write(piece)
        encrypt_s = time.monotonic() - t
    log(f"encrypt alone: {encrypt_s:.1f}s")

    store = open_repository(settings).store
    store.put_bytes("stage-upload/warm-up", b"x")  # the first write to a bucket allocates its volume
    _warm(sealed_path)
    t = time.monotonic()
    store.upload_stream("stage-upload/base.tar.dv", _file_chunks(sealed_path))
    upload_s = time.monotonic() - t
    store.delete("stage-upload/base.tar.dv")
    log(f"upload alone: {upload_s:.1f}s ({sealed_path.stat().st_size / MIB:.0f} MiB)")
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


def _file_chunks(path: Path, size: int = 4 * MIB):
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def _warm(path: Path) -> None:
    """Read a file once so the timed stage reads it from the page cache, not the disk."""
    for _ in _file_chunks(path):
        pass


if __name__ == "__main__":
    sys.exit(main())
