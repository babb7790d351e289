"""Which class serves which `targets.<name>.engine`: the one place that names every engine."""

from __future__ import annotations

from deskvault_core.config import TargetSettings
from workers.engines.base import Engine
from workers.engines.postgresql.engine import PostgresEngine

ENGINES: dict[str, type[Engine]] = {PostgresEngine.name: PostgresEngine}


def engine_for(target: TargetSettings) -> Engine:
    """The engine of a configured target (the configuration has already checked the name)."""
    return ENGINES[target.engine](target)
