"""Unpack a verified tar stream into a folder with GNU tar, in a process of its own.

Python's tarfile would unpack in the thread that also decrypts and decompresses; GNU tar writes the
files on the other core meanwhile. The stream is read to its very end even if tar stops early, because
the end is where the repository checks the whole object's size and SHA-256.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from deskvault_core.errors import DeskvaultError


class UnpackError(DeskvaultError):
    """tar could not unpack a backup."""


def unpack_tar(chunks: Iterable[bytes], into: Path) -> None:
    """Write the tar stream `chunks` out under `into` (which must exist); errors from `chunks` propagate."""
    with tempfile.TemporaryFile() as errors:
        # --no-same-owner: files belong to whoever restores; the caller hands them to the server's user.
        proc = subprocess.Popen(
            ["tar", "--extract", "--file=-", f"--directory={into}", "--no-same-owner"],
            stdin=subprocess.PIPE,
            stderr=errors,
        )
        assert proc.stdin is not None
        try:
            tar_open = True
            for chunk in chunks:
                if tar_open:
                    try:
                        proc.stdin.write(chunk)
                    except BrokenPipeError:
                        tar_open = False  # tar ended (its exit status tells why); keep verifying
            if tar_open:
                proc.stdin.close()
            returncode = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if returncode != 0:
            errors.seek(0)
            said = errors.read().decode("utf-8", "replace").strip()[-1000:]
            raise UnpackError(f"tar could not unpack the backup into {into} (exit {returncode}): {said}")
