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
    ["init"],
    ["check"],
    ["migrate"],
    ["keys"],
    ["keys", "create"],
    ["keys", "rotate"],
    ["keys", "list"],
    ["keys", "retire"],
    ["completion"],
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


def test_options_that_make_no_sense_together_or_alone_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scheduler", "--json"]) == 2
    assert "--json: only with --once" in capsys.readouterr().err
    assert main(["worker", "--stop-timeout", "-1"]) == 2
    assert "--stop-timeout: must be 0 or more seconds" in capsys.readouterr().err


def test_a_missing_config_file_is_explained(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "none.toml"), "status"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_with_no_config_anywhere_a_command_says_where_it_looked(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import deskvault.cli as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DESKVAULT_CONFIG", raising=False)
    monkeypatch.setattr(cli, "SYSTEM_CONFIG", tmp_path / "etc" / "deskvault.toml")  # none here either
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert "no configuration: looked for --config, $DESKVAULT_CONFIG" in err
    assert str(tmp_path / ".deskvault" / "deskvault.toml") in err
    assert str(tmp_path / "etc" / "deskvault.toml") in err


def test_the_system_config_is_found_when_there_is_no_other(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    import deskvault.cli as cli

    system = tmp_path / "etc" / "deskvault.toml"
    system.parent.mkdir()
    system.write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DESKVAULT_CONFIG", raising=False)
    monkeypatch.setattr(cli, "SYSTEM_CONFIG", system)
    assert cli._config_path(argparse.Namespace(config=None)) == str(system)


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"deskvault {version('deskvault')}"


def test_python_m_deskvault_is_the_command() -> None:
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "deskvault", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("deskvault "), run.stderr


def _every_parser(parser):
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _every_parser(child)


def test_every_option_has_help_text() -> None:
    import argparse

    from deskvault.cli import _parser

    missing = [
        f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        for parser in _every_parser(_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction | argparse._HelpAction)
        and not (action.help and action.help != argparse.SUPPRESS)
    ]
    assert missing == []


def test_publish_event_help_lists_that_events_fields(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["publish", "tenant-restore-requested", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage: deskvault publish tenant-restore-requested" in out
    assert any(line.startswith("  --tenant  (required)") for line in out.splitlines())
    assert any(line.startswith("  --at  (required)") for line in out.splitlines())
    assert "  --type " not in out and "  --version " not in out
