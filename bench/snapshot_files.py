"""Benchmark: file-tree snapshots (the files driver) against reading the same tree, in the same run.

Builds a tree of random data (attachments are mostly compressed already: images, PDFs), then times:
  read       every file read once, 1 MiB at a time, discarded (the baseline: the disk and page cache)
  snapshot   the first snapshot: chunking, keyed hashing, zstd, AES-256-GCM, upload to SeaweedFS
  again      a second snapshot after 1 % of the bytes changed (new files and edits inside files)
  restore    the second snapshot into a new folder
Reported: throughputs in MiB/s of tree bytes, snapshot / read as a ratio, and the new bytes the second
snapshot stored as a share of the tree. Before the read and before the first snapshot the page cache is
dropped (`/proc/sys/vm/drop_caches`, as root), so both read the tree from disk; where that is not
permitted both find it cached, and the report says which.

Run: .venv/bin/python bench/snapshot_files.py [--gib 1] [--keep]
Needs RabbitMQ, PostgreSQL on 127.0.0.1:5432 (control database) and SeaweedFS via .deskvault.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import BenchServices, log  # noqa: E402
from workers.context import open_repository  # noqa: E402
from workers.servers import filetrees, tree_restore  # noqa: E402

MIB = 2**20
FILE_SIZE = 4 * MIB


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=1.0, help="size of the tree")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and the objects")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="deskvault-bench-snapshot-"))
    services = BenchServices("snapshot").__enter__()
    repo = None
    try:
        tree = scratch / "tree"
        rng = random.Random(11)
        files = int(args.gib * 1024 * MIB / FILE_SIZE)
        log(f"writing a tree of {files} files of 4 MiB")
        for i in range(files):
            folder = tree / f"{i % 32:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"f{i:05d}.bin").write_bytes(rng.randbytes(FILE_SIZE))
        settings = services.settings(
            scratch,
            target="unused",
            conninfo="host=127.0.0.1",
            prefix="bench-snapshot",
            extra=f'[servers.bench]\ndriver = "files"\npaths = ["{tree}"]',
        )
        repo = open_repository(settings)
        size = files * FILE_SIZE

        cold = _drop_caches()
        read_s = _timed(lambda: _read_all(tree))
        log(f"read: {size / MIB / read_s:.0f} MiB/s")
        first_s = _timed(
            lambda: filetrees.take_snapshot(repo, "bench", (str(tree),), snapshot_id="s1", extra={})
        )
        log(f"snapshot: {size / MIB / first_s:.0f} MiB/s")
        changed = _change_one_percent(tree, rng, size)
        again_s = _timed(
            lambda: filetrees.take_snapshot(repo, "bench", (str(tree),), snapshot_id="s2", extra={})
        )
        second = filetrees.list_snapshots(repo, "bench")[-1]
        log(
            f"second snapshot after {changed / MIB:.1f} MiB changed: {again_s:.1f}s, "
            f"{second['new_bytes'] / MIB:.1f} MiB new"
        )
        into = scratch / "restored"
        restore_s = _timed(lambda: tree_restore.restore_snapshot(repo, second, into, on_progress=log))
        result = {
            "tree_mib": round(size / MIB),
            "files": files,
            "page_cache": "dropped before the read and the snapshot" if cold else "warm (could not drop)",
            "read_mib_per_s": round(size / MIB / read_s, 1),
            "snapshot_mib_per_s": round(size / MIB / first_s, 1),
            "ratio_snapshot_over_read": round(read_s / first_s, 2),
            "second_snapshot": {
                "changed_mib": round(changed / MIB, 1),
                "changed_share": round(changed / size, 4),
                "seconds": round(again_s, 1),
                "new_mib": round(second["new_bytes"] / MIB, 1),
                "new_share": round(second["new_bytes"] / size, 4),
                "reused_files": second["reused_files"],
            },
            "restore_mib_per_s": round(size / MIB / restore_s, 1),
            "cores": os.cpu_count(),
        }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if repo is not None and not args.keep:
            for key in list(repo.store.list_keys()):
                repo.store.delete(key)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        services.__exit__(None, None, None)


def _timed(work) -> float:
    start = time.monotonic()
    work()
    return time.monotonic() - start


def _drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def _read_all(tree: Path) -> None:
    for path in sorted(tree.rglob("*.bin")):
        with path.open("rb") as f:
            while f.read(MIB):
                pass


def _change_one_percent(tree: Path, rng: random.Random, size: int) -> int:
    """Half as new files, half as 256 KiB edits inside existing files."""
    budget = size // 100
    changed = 0
    (tree / "new").mkdir()
    while changed < budget // 2:
        (tree / "new" / f"n{changed}.bin").write_bytes(rng.randbytes(MIB))
        changed += MIB
    files = sorted(tree.glob("*/f*.bin"))
    while changed < budget:
        with rng.choice(files).open("r+b") as f:
            f.seek(rng.randrange(0, FILE_SIZE - 256 * 1024))
            f.write(rng.randbytes(256 * 1024))
        changed += 256 * 1024
    return changed


if __name__ == "__main__":
    sys.exit(main())
