"""Where the JSON Schema files for the events and their envelope live, for tools and tests that read them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .events import EVENT_CLASSES, SCHEMA_VERSION

SCHEMA_DIR = Path(__file__).parent / "schemas"
ENVELOPE = "envelope"


def schema_path(name: str) -> Path:
    """The schema file for an event type (`backup-due`) or for `envelope`."""
    if name == ENVELOPE:
        return SCHEMA_DIR / "envelope.schema.json"
    if name not in EVENT_CLASSES:
        raise ValueError(f"no schema for {name!r}; known: {', '.join([*EVENT_CLASSES, ENVELOPE])}")
    return SCHEMA_DIR / f"{name}.v{SCHEMA_VERSION}.schema.json"


def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema for an event type or `envelope`."""
    schema: dict[str, Any] = json.loads(schema_path(name).read_text(encoding="utf-8"))
    return schema


# What deskvault publishes to the SaaS (messages/outbound.py), each with a schema under schemas/outbound/.
OUTBOUND_TYPES = ("export-ready", "purge-upcoming", "tenant-restored")


def outbound_schema_path(name: str) -> Path:
    if name not in OUTBOUND_TYPES:
        raise ValueError(f"no outbound schema for {name!r}; known: {', '.join(OUTBOUND_TYPES)}")
    return SCHEMA_DIR / "outbound" / f"{name}.v1.schema.json"


def load_outbound_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(outbound_schema_path(name).read_text(encoding="utf-8"))
    return schema
