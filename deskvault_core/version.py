"""deskvault's version, as the installed package states it (pyproject.toml's `version`)."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    try:
        return metadata.version("deskvault")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed; run `pip install .`)"
