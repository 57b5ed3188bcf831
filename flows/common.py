"""Orchestration helpers shared by the flows: config loading, the repository, task defaults."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from tasks.config import Config, load_config
from tasks.errors import retry_transient
from tasks.repository import Repository, open_repository

# Network steps retry with backoff, but only on transient errors (tasks.errors).
NETWORK_RETRIES: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": retry_transient,
}


def load(config_path: str | None) -> tuple[Config, Repository]:
    cfg = load_config(config_path)
    return cfg, open_repository(cfg.repository)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def logger() -> Any:
    return get_run_logger()
