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
