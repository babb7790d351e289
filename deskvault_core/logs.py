"""Logging set-up shared by every deskvault process, with a last line of defence against leaked secrets."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
LOG_FORMAT_ENV = "DESKVAULT_LOG_FORMAT"

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


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time (UTC, RFC 3339), level, logger, process,
    message, and the traceback as one string when there is one; redacted like the text form."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, ensure_ascii=False))


# pika narrates a failed connection in six or seven ERROR records (socket, connector, workflow, ...),
# some with tracebacks, and then raises: the caller's one line (`cannot reach RabbitMQ at ...`, or
# dramatiq's restart notice) says all of it.
_PIKA_CONNECT_LOGGERS = ("pika.adapters.utils.connection_workflow", "pika.adapters.utils.io_services_utils")
_PIKA_CONNECT_MESSAGES = ("Connection workflow failed", "Error in _create_connection")


class OneLineFromLibraries(logging.Filter):
    """pika's narration of a failed connection dropped (the exception it raises reaches a caller that
    says it in one line); any other pika warning kept, as one line with its exception's text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in _PIKA_CONNECT_LOGGERS or (
            record.name.startswith("pika") and str(record.msg).startswith(_PIKA_CONNECT_MESSAGES)
        ):
            return False
        if record.name.startswith("pika") and record.levelno >= logging.WARNING:
            message = _first_line(record.getMessage())
            if record.exc_info and record.exc_info[1] is not None:
                error = record.exc_info[1]
                message = f"{message} ({type(error).__name__}: {_first_line(str(error))})"
            record.msg, record.args, record.exc_info, record.exc_text = message, None, None, None
        return True


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def setup_logging(level: str = "INFO", log_format: str | None = None) -> None:
    """`log_format` "text" (default) or "json"; None: $DESKVAULT_LOG_FORMAT, which worker processes and
    `deskvault up`'s children inherit from the command that started them."""
    log_format = (log_format or os.environ.get(LOG_FORMAT_ENV) or "text").lower()
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format: {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            RedactingFormatter("%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s")
        )
    handler.addFilter(OneLineFromLibraries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pika and botocore are chatty at INFO; their warnings still show.
    for noisy in ("pika", "botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
