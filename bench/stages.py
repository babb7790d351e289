"""Each stage of deskvault's backup and restore pipelines run alone over the same bytes, to find the slowest.

The stages work on `Item`s: one per object of a backup (or WAL file), its plaintext on local disk and,
once the backup stages ran, its compressed and encrypted forms beside it. Every timed stage runs
`threads` items at a time (default: one per core, as the pipeline's parallelism), and starts with the
page cache dropped (`drop_caches`) and then holding the stage's input, so a stage that reads a local
file pays for memory, not disk -- except `read_files` and `download`, whose input is what they measure.
Each stage writes its output to a file (the page cache, no fsync) where a later stage needs it; only
`write` syncs.

Each stage's machine CPU seconds (`bench/cpu.py`: every process, SeaweedFS's and PostgreSQL's too) go
into `CPU_SECONDS`; `machine_limit` turns them into the fastest a pipeline of those stages could run on
this machine's cores, where the stages share them instead of running side by side on cores of their own.

Backup: read (the source's data files), compress (zstd at the repository's level and threads),
encrypt (AES-256-GCM, `workers.repository.crypto`), upload (raw S3 PUTs of the encrypted bytes).
Restore: download (raw S3 GETs of the stored objects), decrypt, decompress, write (plaintext to files,
then one sync). Replay is PostgreSQL's, timed by the benchmark that restores.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard
from boto3.s3.transfer import TransferConfig

from bench.common import drop_caches, log
from bench.cpu import CORES, Busy
from workers.engines.postgresql import datafiles
from workers.repository.crypto import decrypt_stream, encrypt_stream

MIB = 2**20
CHUNK = MIB
READ_SIZE = 4 * MIB
THREADS = os.cpu_count() or 1
CPU_SECONDS: dict[str, float] = {}  # stage -> the machine's busy CPU seconds while it ran alone


@dataclass
class Item:
    """One object: its repository key (the encryption's context), plaintext file and derived files."""

    key: str
    plain: Path
    plain_size: int
    stored_size: int = 0
    compressed: Path | None = None
    sealed: Path | None = None


def fetch_plaintext(repo, objects: list[dict], folder: Path, *, what: str = "object") -> list[Item]:
    """Untimed: the plaintext of each object (`key`, optional `sha256`, `plain_size`, `stored_size`)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for n, entry in enumerate(objects):
        path = folder / f"{what}-{n:05d}.plain"
        expect = {}
        if entry.get("sha256"):
            expect = {"expect_sha256": entry["sha256"], "expect_size": entry.get("plain_size")}
        size = 0
        with path.open("wb") as out:
            for piece in repo.get_stream(entry["key"], **expect):
                out.write(piece)
                size += len(piece)
        items.append(Item(entry["key"], path, size, int(entry.get("stored_size") or 0)))
    return items


def data_files(datadir: Path) -> list[Path]:
    """The files of a data directory that a base backup reads (what deskvault's own walk lists)."""
    files, _ = datafiles.walk(datadir)
    return [datadir / f.path for f in files]


def read_files(paths: list[Path], threads: int = THREADS) -> tuple[int, float]:
    """(bytes, seconds): every file read from disk (the cache dropped first), `threads` at a time."""

    def read(path: Path) -> int:
        try:
            with path.open("rb") as f:
                return sum(len(b) for b in iter(lambda: f.read(READ_SIZE), b""))
        except OSError:  # a file PostgreSQL removed meanwhile
            return 0

    drop_caches()
    with Busy() as busy, ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, paths))
    CPU_SECONDS["read"] = busy.cpu_seconds
    return total, busy.wall_seconds


def compress(items: list[Item], level: int, zstd_threads: int, threads: int = THREADS) -> float:
    """Seconds to zstd-compress every item's plaintext (as the repository does: level, threads, checksum)."""

    def one(item: Item) -> None:
        item.compressed = item.plain.with_suffix(".zst")
        compressor = zstandard.ZstdCompressor(level=level, threads=zstd_threads, write_checksum=True)
        with item.plain.open("rb") as src, item.compressed.open("wb") as dst:
            compressor.copy_stream(src, dst, read_size=CHUNK, write_size=CHUNK)

    return _timed(items, one, [i.plain for i in items], threads)


def encrypt(items: list[Item], keyring, threads: int = THREADS) -> float:
    """Seconds to seal every compressed item with AES-256-GCM under a fresh data key, its key as context."""

    def one(item: Item) -> None:
        item.sealed = item.plain.with_suffix(".dv")
        with item.sealed.open("wb") as out:
            for piece in encrypt_stream(keyring, file_chunks(item.compressed), context=item.key.encode()):
                out.write(piece)

    return _timed(items, one, [i.compressed for i in items], threads)


def upload(
    items: list[Item], client, bucket: str, prefix: str, *, part_size: int, upload_threads: int,
    threads: int = THREADS,
) -> float:  # fmt: skip
    """Seconds to PUT every sealed item (multipart above `part_size`, `upload_threads` parts at once)."""
    transfer = TransferConfig(
        multipart_threshold=part_size, multipart_chunksize=part_size, max_concurrency=upload_threads
    )
    keys = {id(item): f"{prefix}stage-upload/{n:05d}.dv" for n, item in enumerate(items)}
    client.put_object(Bucket=bucket, Key=f"{prefix}stage-upload/warm-up", Body=b"x")  # allocates a volume

    def one(item: Item) -> None:
        client.upload_file(str(item.sealed), bucket, keys[id(item)], Config=transfer)

    try:
        return _timed(items, one, [i.sealed for i in items], threads)
    finally:
        for key in [*keys.values(), f"{prefix}stage-upload/warm-up"]:
            client.delete_object(Bucket=bucket, Key=key)


def download(client, bucket: str, keys: list[str], threads: int = THREADS) -> tuple[int, float]:
    """(bytes, seconds): a raw GET of every object, its body read and discarded; the cache dropped first."""

    def one(key: str) -> int:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        return sum(len(chunk) for chunk in body.iter_chunks(8 * MIB))

    drop_caches()
    with Busy() as busy, ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(one, keys))
    CPU_SECONDS["download"], seconds = busy.cpu_seconds, busy.wall_seconds
    log(f"stage alone: download: {seconds:.2f}s for {total / MIB:.1f} MiB over {len(keys)} object(s)")
    return total, seconds


def decrypt(items: list[Item], keyring, threads: int = THREADS) -> float:
    """Seconds to open every sealed item (output discarded)."""

    def one(item: Item) -> None:
        for _ in decrypt_stream(keyring, file_chunks(item.sealed), context=item.key.encode()):
            pass

    return _timed(items, one, [i.sealed for i in items], threads)


def decompress(items: list[Item], threads: int = THREADS) -> float:
    """Seconds to decompress every compressed item (output discarded)."""

    def one(item: Item) -> None:
        with item.compressed.open("rb") as f:
            for _ in zstandard.ZstdDecompressor().read_to_iter(f, read_size=CHUNK, write_size=CHUNK):
                pass

    return _timed(items, one, [i.compressed for i in items], threads)


def write(items: list[Item], folder: Path, threads: int = THREADS) -> float:
    """Seconds to write every item's plaintext to a new file, then sync once."""
    folder.mkdir(parents=True, exist_ok=False)

    def one(item: Item) -> None:
        with (folder / item.plain.name).open("wb") as out:
            for chunk in file_chunks(item.plain):
                out.write(chunk)

    try:
        return _timed(items, one, [i.plain for i in items], threads, then=os.sync)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def rates(seconds: dict[str, float], nbytes: dict[str, int] | int) -> dict[str, dict[str, float]]:
    """Per stage: its seconds, MiB/s (of `nbytes`, one figure for all or one per stage) and the machine's
    CPU seconds meanwhile (where measured)."""
    out = {}
    for name, s in seconds.items():
        n = nbytes if isinstance(nbytes, int) else nbytes[name]
        out[name] = {"seconds": round(s, 2), "mib_per_s": round(n / s / MIB, 1) if s > 0 else None}
        if name in CPU_SECONDS:
            out[name]["cpu_seconds"] = round(CPU_SECONDS[name], 2)
    return out


def machine_limit(stage_rates: dict[str, dict[str, float]], nbytes: int, after: tuple[str, ...] = ()) -> dict:
    """The fastest a pipeline of these stages could go here: the stages overlapping, it takes at least
    the slowest one's seconds and at least their CPU seconds spread over every core; the stages in
    `after` (replay: PostgreSQL starts once the base is in) follow the rest, adding their own seconds."""
    overlapping = {k: v for k, v in stage_rates.items() if k not in after}
    cpu = sum(v.get("cpu_seconds", 0.0) for v in overlapping.values())
    seconds = max(max(v["seconds"] for v in overlapping.values()), cpu / CORES)
    seconds += sum(stage_rates[k]["seconds"] for k in after)
    return {
        "seconds": round(seconds, 2),
        "mib_per_s": round(nbytes / seconds / MIB, 1),
        "overlapping_cpu_seconds": round(cpu, 2),
        "cores": CORES,
    }


def slowest(stage_rates: dict[str, dict[str, float]]) -> str:
    return min(stage_rates, key=lambda name: stage_rates[name]["mib_per_s"] or float("inf"))


def file_chunks(path: Path, size: int = READ_SIZE) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def warm(paths: list[Path]) -> None:
    """Read files once so a timed stage reads them from the page cache, not the disk."""
    for path in paths:
        for _ in file_chunks(path):
            pass


def _timed(
    items: list[Item], one: Callable[[Item], None], inputs: list[Path], threads: int,
    then: Callable[[], None] | None = None,
) -> float:  # fmt: skip
    drop_caches()
    warm(inputs)
    stage = one.__qualname__.split(".")[0]
    with Busy() as busy:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for _ in pool.map(one, items):
                pass
        if then is not None:
            then()
    CPU_SECONDS[stage] = busy.cpu_seconds
    log(f"stage alone: {stage}: {busy.wall_seconds:.2f}s, {len(items)} item(s), {busy.share:.0%} of the CPU")
    return busy.wall_seconds
