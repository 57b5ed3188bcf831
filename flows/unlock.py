"""Orchestration: the ``unlock`` flow — remove the repository's backup lock when its holder is gone.

The operator's button for ``gravl-dr unlock`` (which runs without Prefect): deployment
``unlock-manual``, artifact ``unlock-report-<cluster>``. The decision is tasks.backup.break_lock's:
a holder alive on the worker's host is never removed, one on another host only with ``force``.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import NETWORK_RETRIES, load, logger, publish_report
from flows.heartbeat import send_heartbeat
from flows.params import ConfigPath
from tasks import backup as steps
from tasks.errors import one_line
from tasks.reporting import document, kv_table, report_key
from tasks.repository import Repository


@task(name="read-lock", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def read_lock(repo: Repository) -> str | None:
    lock = steps.read_lock(repo)
    what = steps.describe_lock(lock) if lock is not None else None
    logger().info("%s holds %s", repo.url, what or "no backup lock")
    return what


@task(name="break-lock", cache_policy=NO_CACHE)
def break_lock(repo: Repository, force: bool) -> str:
    done = steps.break_lock(repo, force=force)
    logger().warning("%s", done)
    return done


@flow(name="unlock", log_prints=False, on_running=[send_heartbeat])
def unlock_flow(config_path: ConfigPath = None, force: bool = False) -> str:
    """Remove the repository's backup lock when the backup holding it is gone (a host that died).

    Args:
        config_path: The gravl-dr config file; empty: $GRAVL_DR_CONFIG of the worker, then
            gravl-dr.yaml in its working directory.
        force: Also remove a lock held from another host, whose process cannot be checked from
            the worker: only once you know that backup is dead. A lock whose process runs on the
            worker's host is never removed.
    """
    cfg, repo = load(config_path)
    key = report_key("unlock", cfg.cluster)
    held = read_lock(repo)
    try:
        done = break_lock(repo, force) if held is not None else f"no backup lock is held in {repo.url}"
    except Exception as exc:
        rows: list[tuple[str, object]] = [("lock", held), ("why kept", one_line(exc))]
        publish_report(
            key, document([f"# Unlock of {cfg.cluster}: lock kept", "", *kv_table(rows)]), "lock kept"
        )
        raise
    rows = [("lock", held or "none"), ("result", done)]
    title = f"# Unlock of {cfg.cluster}: {'removed' if held else 'nothing to do'}"
    publish_report(key, document([title, "", *kv_table(rows)]), done)
    return done
