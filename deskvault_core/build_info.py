"""`deskvault_build_info{version, python} 1`, served by every deskvault process with metrics."""

from __future__ import annotations

import platform
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from deskvault_core.version import version


class BuildInfo:
    """A collector: which release each scraped process runs."""

    def collect(self) -> Any:
        family = GaugeMetricFamily(
            "deskvault_build_info", "The deskvault release this process runs", labels=["version", "python"]
        )
        family.add_metric([version(), platform.python_version()], 1)
        yield family
