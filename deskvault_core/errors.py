"""The root of deskvault's errors; every error the CLI can show carries an exit code."""

from __future__ import annotations


class DeskvaultError(Exception):
    """Something went wrong in deskvault."""

    exit_code = 1


class ConfigError(DeskvaultError):
    """The configuration is invalid; the message names the key."""

    exit_code = 2
