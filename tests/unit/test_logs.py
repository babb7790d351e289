"""Secrets never reach logs: the formatter's last line of defence."""

from __future__ import annotations

import logging

from deskvault_core.logs import RedactingFormatter, redact


def test_credentials_in_urls_and_key_values_are_masked() -> None:
    line = redact(
        "connect amqp://svc:hunter2@rabbit:5672/ and DRIVER={x};UID=app;PWD=s3cr3t; "
        "secret_key=abc123 password=pw"
    )
    for secret in ("hunter2", "s3cr3t", "abc123", "=pw"):
        assert secret not in line
    assert "amqp://svc:***@rabbit" in line


def test_the_formatter_masks_what_a_handler_would_print() -> None:
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "failed with %s", ("password=topsecret",), None
    )
    assert "topsecret" not in RedactingFormatter("%(message)s").format(record)


def _record(name: str, level: int, msg: str, args: tuple = (), exc_info=None) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


def test_json_lines_carry_the_fields_a_shipper_needs_and_stay_redacted() -> None:
    import json

    from deskvault_core.logs import JsonFormatter

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = _record(
            "workers.backup", logging.ERROR, "failed for %s", ("amqp://u:hunter2@h/",), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line and "hunter2" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "workers.backup"
    assert entry["message"] == "failed for amqp://u:***@h/"
    assert entry["time"].endswith("+00:00") and "RuntimeError: boom" in entry["exception"]


def test_pikas_warnings_become_one_line() -> None:
    from deskvault_core.logs import OneLineFromLibraries

    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError:
        import sys

        record = _record(
            "pika.channel",
            logging.ERROR,
            "TCP Connection attempt failed: %r\nTraceback (most recent call last):\n  ...",
            ("127.0.0.1:1",),
            sys.exc_info(),
        )
    assert OneLineFromLibraries().filter(record)
    text = logging.Formatter("%(message)s").format(record)
    refused = "(ConnectionRefusedError: [Errno 111] Connection refused)"
    assert text == f"TCP Connection attempt failed: '127.0.0.1:1' {refused}"
    ours = _record("workers.backup", logging.ERROR, "two\nlines")
    assert OneLineFromLibraries().filter(ours) and ours.getMessage() == "two\nlines"  # ours are left alone


def test_the_log_format_reaches_child_processes_through_the_environment(monkeypatch) -> None:
    import os

    from deskvault.cli import main
    from deskvault_core.logs import LOG_FORMAT_ENV

    monkeypatch.delenv(LOG_FORMAT_ENV, raising=False)
    main(["--log-format", "json", "--config", "/nonexistent.toml", "status"])
    assert os.environ[LOG_FORMAT_ENV] == "json"
    logging.getLogger().handlers.clear()


def test_a_refused_connection_is_one_line_from_the_command(tmp_path) -> None:
    import os
    import subprocess
    import sys

    config = tmp_path / "empty.toml"
    config.write_text("")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "deskvault",
            "--config",
            str(config),
            "publish",
            "backup-due",
            "--target",
            "x",
            "--kind",
            "full",
            "--slot",
            "2026-12-06T00:00:00Z",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DESKVAULT_BROKER__URL": "amqp://guest:pw@127.0.0.1:1/"},
    )
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("deskvault: error: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/")
