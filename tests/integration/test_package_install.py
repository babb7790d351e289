"""deskvault as a user installs it: `pip install .` from the tracked files into a new venv, not editable.

The design card keeps `messages`, `workers` and `producers` as top-level packages (docs/design.md,
"Packaging"); this proves the installed copy stands alone: the command runs, the schemas are inside
the wheel, and the packages imported are the installed ones, not this checkout's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_a_clean_install_runs_and_carries_every_schema(tmp_path: Path) -> None:
    source = tmp_path / "src"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        path = Path(name.decode())
        if (ROOT / path).is_file():
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, source / path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"  # no checkout on the path
    elsewhere.mkdir()

    def run(*command: str) -> str:
        done = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert run(str(venv / "bin" / "deskvault"), "--version").strip() == f"deskvault {version}"
    assert "Exit status: 0 every check OK, 1 any WARN, 2 any FAIL" in " ".join(
        run(str(venv / "bin" / "deskvault"), "check", "--help").split()
    )
    assert run(str(venv / "bin" / "python"), "-m", "deskvault", "--version").startswith("deskvault ")
    loaded = json.loads(
        run(
            str(venv / "bin" / "python"),
            "-c",
            "import json, messages\n"
            "from messages.events import EVENT_CLASSES\n"
            "from messages.schema_files import OUTBOUND_TYPES, load_outbound_schema, load_schema\n"
            "names = [load_schema(n)['title'] for n in [*EVENT_CLASSES, 'envelope']]\n"
            "names += [load_outbound_schema(n)['title'] for n in OUTBOUND_TYPES]\n"
            "print(json.dumps({'from': messages.__file__, 'titles': names}))",
        )
    )
    assert str(venv) in loaded["from"], loaded["from"]
    from messages.events import EVENT_CLASSES
    from messages.schema_files import OUTBOUND_TYPES

    assert len(loaded["titles"]) == len(EVENT_CLASSES) + 1 + len(OUTBOUND_TYPES)
