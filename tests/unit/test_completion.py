"""`deskvault completion bash` completes commands and their options in a real bash."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

COMPLETE = r"""
source <($DESKVAULT completion bash)
function=$(complete -p deskvault | sed -E 's/.*-F ([^ ]+).*/\1/')
read -r -a COMP_WORDS <<< "$LINE"
[[ "$LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE="$LINE"
COMP_POINT=${#LINE}
"$function" deskvault "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def _completions(line: str) -> set[str]:
    deskvault = [sys.executable, "-m", "deskvault.cli"]
    result = subprocess.run(
        ["bash", "-c", COMPLETE],
        env={"DESKVAULT": " ".join(deskvault), "LINE": line, "PATH": "/usr/bin:/bin"},  # no spaces in paths
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return {word.strip() for word in result.stdout.splitlines() if word.strip()}


def test_bash_completes_commands_subcommands_and_options() -> None:
    assert "backups" in _completions("deskvault back")
    assert {"list", "verify", "expire"} <= _completions("deskvault backups ")
    assert "--target" in _completions("deskvault backups verify --t")
    assert {"backup", "verify"} <= _completions("deskvault worker --pool ")
