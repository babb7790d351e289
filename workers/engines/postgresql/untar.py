"""Unpack a verified tar stream into a folder with GNU tar, in a process of its own.

Python's tarfile would unpack in the thread that also decrypts and decompresses; GNU tar writes the
files on the other core meanwhile. The stream is read to its very end even if tar stops early, because
the end is where the repository checks the whole object's size and SHA-256.

Each member is checked before tar sees it (see `targuard`), and tar runs as the server's user with
umask 077: what it unpacks belongs to that user alone, and even a member the check let through could
write nowhere that user cannot.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deskvault_core.errors import DeskvaultError
from workers.engines.postgresql.cluster import server_ids, server_user
from workers.engines.postgresql.targuard import TarGuard


class UnpackError(DeskvaultError):
    """tar could not unpack a backup."""


def unpack_tar(chunks: Iterable[bytes], into: Path, guard: TarGuard) -> None:
    """Write the tar stream `chunks` out under `into` (which must exist), each member checked by `guard`;
    errors from `chunks` and refusals from `guard` propagate."""
    if (ids := server_ids()) is not None:
        os.chown(into, *ids)  # tar, as that user, writes into it
    # No owners or modes from the archive: the umask makes everything private.
    command = ["tar", "--extract", "--file=-", "--no-same-owner", "--no-same-permissions"]
    returncode, said = feed_as_server(command, guard(chunks), into)
    if returncode != 0:
        raise UnpackError(f"tar could not unpack the backup into {into} (exit {returncode}): {said}")


def feed_as_server(command: list[str], chunks: Iterable[bytes], cwd: Path) -> tuple[int, str]:
    """Run `command` in `cwd` as the server's user with umask 077, `chunks` on its standard input:
    (exit status, the end of what it said on stderr).

    The folder is entered before the program drops to the server's user: the path to it need not be
    open to that user. `chunks` is read to its very end even if the program stops early, because the
    end is where the repository checks the whole object's size and SHA-256; errors from `chunks`
    propagate, and the program is killed then.
    """
    as_server: dict[str, Any] = {}
    if (user := server_user()) is not None:
        entry = pwd.getpwnam(user)
        as_server = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            command, cwd=cwd, umask=0o077, stdin=subprocess.PIPE, stderr=errors, **as_server
        )
        assert proc.stdin is not None
        try:
            open_ = True
            for chunk in chunks:
                if open_:
                    try:
                        proc.stdin.write(chunk)
                    except BrokenPipeError:
                        open_ = False  # it ended (its exit status tells why); keep verifying
            if open_:
                proc.stdin.close()
            returncode = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        errors.seek(0)
        return returncode, errors.read().decode("utf-8", "replace").strip()[-1000:]
