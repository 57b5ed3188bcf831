"""Orchestration helpers shared by the flows: config loading, the repository, task defaults."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

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


def publish_report(key: str, markdown: str, description: str | None = None) -> None:
    """Publish a flow's report: the one place flows create their markdown artifact (keys and
    tables come from tasks.reporting)."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=key, markdown=markdown, description=description)


def push_flow_metrics(cfg: Config, job: str, values: Mapping[str, float], **labels: str) -> None:
    """Push a flow's metrics (names from the catalog in tasks.metrics), grouped by job, cluster
    and ``labels``; a Pushgateway that does not answer is a warning, never a failed run."""
    from tasks.errors import DRError, one_line
    from tasks.metrics import push_metrics

    try:
        push_metrics(cfg.metrics.pushgateway, job, {"cluster": cfg.cluster, **labels}, values)
    except DRError as exc:
        logger().warning("metrics not pushed: %s", one_line(exc))


@task(name="find-primary", cache_policy=NO_CACHE)
def follow_primary(cfg: Config, repo: Repository | None, job: str, artifact_key: str) -> Config:
    """The config pointed at the node that is the primary now (after a failover, not the configured one).

    Two nodes out of recovery is a split-brain alarm: a report under the flow's own artifact key,
    ``gravl_split_brain 1`` for the flow's job, and the flow fails. Nothing is backed up or
    checked against whichever node answered first.
    """
    from tasks.errors import one_line
    from tasks.roles import SplitBrain
    from tasks.topology import find_primary

    def alarm(value: float) -> None:
        push_flow_metrics(cfg, job, {"gravl_split_brain": value})

    try:
        followed, choice = find_primary(cfg, repo)
    except SplitBrain as exc:
        alarm(1.0)
        publish_report(
            artifact_key,
            f"# {job}: SPLIT BRAIN — nothing done\n\n`{one_line(exc)}`\n\n"
            "Fence one of the nodes (stop it), then re-run.\n",
            f"{job} of {cfg.cluster}: SPLIT BRAIN",
        )
        logger().error("%s", one_line(exc))
        raise
    alarm(0.0)
    if choice.moved:
        logger().warning(
            "the primary is %s, not the configured %s (%s): %s acts on %s",
            choice.primary,
            choice.configured,
            choice.reason,
            job,
            choice.primary,
        )
    if choice.in_recovery:
        logger().warning("%s is in recovery (a standby): nobody accepts writes", choice.primary)
    return followed
