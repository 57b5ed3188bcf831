"""Adapter: pushing a flow's metrics to a Prometheus Pushgateway.

Pushes use POST (pushadd) so that a failure push does not wipe the last-success series of the
same group. Grouping: job = flow name, plus cluster (and kind where a flow has kinds).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from tasks.errors import StorageUnavailable

log = logging.getLogger(__name__)


def push_metrics(
    gateway: str | None,
    job: str,
    grouping: Mapping[str, str],
    values: Mapping[str, tuple[float, str]],
    timeout: float = 10,
) -> bool:
    """Push ``name -> (value, help)`` gauges; returns False when no gateway is configured."""
    if not gateway:
        return False
    from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

    registry = CollectorRegistry()
    for name, (value, help_text) in values.items():
        Gauge(name, help_text, registry=registry).set(value)
    try:
        pushadd_to_gateway(gateway, job=job, registry=registry, grouping_key=dict(grouping), timeout=timeout)
    except OSError as exc:
        raise StorageUnavailable(f"cannot push metrics to {gateway}: {exc}") from None
    log.info("pushed %d metric(s) to %s (job=%s %s)", len(values), gateway, job, dict(grouping))
    return True
