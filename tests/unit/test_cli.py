"""Every sub-command answers --help, and bad usage exits 2 with a message that says what is wrong."""

from __future__ import annotations

import pytest

from deskvault.cli import main

COMMANDS = [
    [],
    ["up"],
    ["scheduler"],
    ["worker"],
    ["publish"],
    ["backups"],
    ["backups", "list"],
    ["backups", "verify"],
    ["backups", "expire"],
    ["restore"],
    ["wal-stream"],
    ["status"],
    ["migrate"],
    ["keys"],
    ["keys", "create"],
    ["keys", "rotate"],
    ["keys", "list"],
    ["keys", "retire"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "deskvault")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert "usage: deskvault" in capsys.readouterr().out


def test_publish_of_an_unknown_event_type_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["publish", "backup-overdue", "--target", "x"]) == 2
    assert "type:" in capsys.readouterr().err


def test_publish_needs_field_value_pairs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["publish", "account-reactivated", "--tenant"]) == 2
    assert "expected --field value pairs" in capsys.readouterr().err


def test_a_missing_config_file_is_explained(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "none.toml"), "status"]) == 2
    assert "does not exist" in capsys.readouterr().err
