"""Logging set-up shared by every deskvault process, with a last line of defence against leaked secrets."""

from __future__ import annotations

import logging
import re
import sys

# Credentials in URLs (amqp://user:pass@host) and key=value secrets (conninfo, ODBC strings).
_SECRET_PATTERNS = [
    (re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]+@", re.I), r"\g<scheme>***@"),
    (
        re.compile(
            r"(?P<key>\b(?:password|pwd|secret_key|secret|aws_secret_access_key)\s*[=:]\s*)[^\s;,'\"]+", re.I
        ),
        r"\g<key>***",
    ),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        RedactingFormatter("%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pika and botocore are chatty at INFO; their warnings still show.
    for noisy in ("pika", "botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
